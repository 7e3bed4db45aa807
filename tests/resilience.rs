//! Failure behaviour with real processes: replicas killed with SIGKILL, the server killed and
//! restarted, redeploys under the same name, bad input on every kind of route, and a data
//! directory that is full or read-only.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{echo_function, poll, replica_pids, sample, Server};
use reqwest::Method;
use serde_json::json;

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(true)
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn killed_replica_is_restarted_and_counted() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("sturdy")).await.status(), 202);
    s.wait_available("sturdy", 1).await;
    // The series is there at zero before the first restart, for rate() and increase().
    let restarts = r#"faastastic_replica_restarts_total{datacenter="home",function_name="sturdy.openfaas-fn"}"#;
    assert_eq!(sample(&s.metrics().await, restarts), Some(0.0));
    let pids = replica_pids(s.pid());
    assert_eq!(pids.len(), 1, "one replica process: {pids:?}");
    unsafe { libc::kill(pids[0], libc::SIGKILL) };

    let restarted = poll(Duration::from_secs(30), || async {
        let now = replica_pids(s.pid());
        now.len() == 1 && now[0] != pids[0]
    })
    .await;
    assert!(restarted, "a new replica process replaces the killed one");
    s.wait_available("sturdy", 1).await;
    assert_eq!(s.invoke("sturdy", "back").await, (200, "back".to_string()));
    let metrics = s.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"faastastic_replica_restarts_total{datacenter="home",function_name="sturdy.openfaas-fn"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn redeploy_under_the_same_name_never_reaches_the_old_replica() {
    let s = Server::start();
    let version = |v: &str| json!({"service":"app","image":"x","envProcess":format!("echo {v}")});
    for round in 0..3 {
        let v = format!("v{round}");
        assert_eq!(s.deploy(version(&v)).await.status(), 202);
        s.wait_available("app", 1).await;
        let old_pids: HashSet<i32> = replica_pids(s.pid()).into_iter().collect();
        // Hammer it: every answer must come from this deployment.
        for _ in 0..20 {
            assert_eq!(s.invoke("app", "").await, (200, format!("{v}\n")));
        }
        assert_eq!(s.remove("app").await, 202);
        // Right after the delete, before the old processes are even gone, nothing routes there.
        assert_eq!(s.invoke("app", "").await.0, 404);
        let gone = poll(Duration::from_secs(20), || async {
            old_pids.iter().all(|p| !alive(*p))
        })
        .await;
        assert!(gone, "old replicas are stopped after a delete");
    }
    // An update (PUT) rolls to the new version too.
    assert_eq!(s.deploy(version("a")).await.status(), 202);
    s.wait_available("app", 1).await;
    let put = s
        .system(Method::PUT, "/system/functions")
        .json(&version("b"))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);
    let switched = poll(Duration::from_secs(20), || async {
        s.invoke("app", "").await.1 == "b\n"
    })
    .await;
    assert!(switched);
    for _ in 0..20 {
        assert_eq!(
            s.invoke("app", "").await.1,
            "b\n",
            "never back to the old version"
        );
    }
}

#[tokio::test]
async fn server_restart_brings_functions_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = Server::with(common::Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    let mut f = echo_function("durable");
    f["labels"] = json!({"com.openfaas.scale.min": "1"});
    assert_eq!(s.deploy(f).await.status(), 202);
    let scale = s
        .system(Method::POST, "/system/scale-function/durable")
        .json(&json!({"replicas": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(scale.status(), 202);
    s.wait_available("durable", 2).await;
    let secret = s
        .system(Method::POST, "/system/secrets")
        .json(&json!({"name":"kept","value":"v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(secret.status(), 202);
    let old_replicas = replica_pids(s.pid());
    s.kill();
    // Replicas die with the server (no orphans holding ports).
    let orphans_gone = poll(Duration::from_secs(10), || async {
        old_replicas.iter().all(|p| !alive(*p))
    })
    .await;
    assert!(orphans_gone, "replicas must not outlive a killed server");

    let s = Server::with(common::Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    let status = s.wait_available("durable", 2).await;
    assert_eq!(
        status["replicas"], 2,
        "the scaled count survives, not the min"
    );
    assert_eq!(s.invoke("durable", "still here").await.1, "still here");
    let secrets: serde_json::Value = s.get_json("/system/secrets").await;
    assert_eq!(secrets[0]["name"], "kept");
}

#[tokio::test]
async fn not_ready_gives_503_and_dead_upstream_is_marked_internal() {
    let s = Server::with(common::Options {
        config: Some("[proxy]\nready_timeout_ms = 300\n"),
        ..Default::default()
    });
    // HTTP mode whose server never listens: the replica never becomes ready.
    let port = common::free_port();
    let f = json!({"service":"never","image":"x","envProcess":"sleep 600",
        "envVars":{"mode":"http","upstream_url":format!("http://127.0.0.1:{port}")}});
    assert_eq!(s.deploy(f).await.status(), 202);
    let r = s.http.get(s.url("/function/never")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-openfaas-internal"], "proxy");
    let (_, status) = s.status("never").await;
    assert_eq!(status["replicas"], 1);
    assert!(status.get("availableReplicas").is_none(), "{status}");

    // The local platform needs something to run: 400 naming the field.
    let r = s.deploy(json!({"service":"noproc","image":"x"})).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("envProcess"));
    let r = s
        .deploy(json!({"service":"nourl","image":"x","envProcess":"srv","envVars":{"mode":"http"}}))
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("upstream_url"));
}

#[tokio::test]
async fn http_mode_proxies_path_query_and_headers() {
    common::require_program("python3", "python3");
    let s = Server::start();
    let port = common::free_port();
    let f = json!({"service":"web","image":"x",
        "envProcess":format!("python3 -m http.server {port} --bind 127.0.0.1"),
        "envVars":{"mode":"http","upstream_url":format!("http://127.0.0.1:{port}")}});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("web", 1).await;
    // python's http.server lists the working directory: the replica's own directory.
    let r = s.http.get(s.url("/function/web/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("secrets/"));
    let r = s
        .http
        .get(s.url("/function/web/secrets/?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the path suffix and query reach the function"
    );
    let r = s
        .http
        .get(s.url("/function/web/missing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the function's own status passes through");
    assert!(r.headers().get("x-openfaas-internal").is_none());
}

/// A small server for an http-mode function: every path answers "served", `/slow` after 5 s;
/// it listens on the port given as its argument.
const SLOW_SERVER: &str = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/slow"):
            time.sleep(5)
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"served")
    do_POST = do_GET
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// An http-mode function's server is reached without its watchdog, and the answer still
/// keeps the watchdog's contract: `X-Duration-Seconds`, and a 504 once the function's
/// `exec_timeout` passes; on the lane and on the general path. With `local.http_direct =
/// false` the watchdog relays, and a stopped watchdog stops invocations.
#[tokio::test]
async fn http_mode_invocations_reach_the_function_directly_and_keep_its_contract() {
    common::require_program("python3", "python3");
    for (lane, direct) in [(true, true), (false, true), (true, false)] {
        let cfg = format!("[proxy]\nlane = {lane}\n[local]\nhttp_direct = {direct}\n");
        let s = Server::with(common::Options {
            config: Some(&cfg),
            ..Default::default()
        });
        let f = json!({"service": "web", "image": "x",
            "envProcess": "sh -c 'exec python3 -c \"$SERVER\" $PORT'",
            "envVars": {"mode": "http", "upstream_url": "http://127.0.0.1:0",
                        "exec_timeout": "1s", "SERVER": SLOW_SERVER}});
        assert_eq!(s.deploy(f).await.status(), 202);
        s.wait_available("web", 1).await;
        let r = s
            .http
            .post(s.url("/function/web/x"))
            .body("b")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let took: f64 = r.headers()["x-duration-seconds"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((0.0..1.0).contains(&took), "{took}");
        assert_eq!(r.text().await.unwrap(), "served");
        // Past the function's exec_timeout (1 s), not the proxy's (60 s).
        let asked = std::time::Instant::now();
        let r = s
            .http
            .get(s.url("/function/web/slow"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504, "lane={lane} direct={direct}");
        assert!(
            asked.elapsed() < Duration::from_secs(4),
            "{:?}",
            asked.elapsed()
        );
        if direct {
            assert!(r.text().await.unwrap().contains("exec_timeout"));
        }
        // The watchdog stopped: the function answers on only when it is reached directly.
        assert_eq!(
            common::answers_with_watchdog_stopped(&s, "/function/web/x").await,
            direct,
            "lane={lane} direct={direct}"
        );
    }
}

/// A function that writes bytes that are not UTF-8 to its output keeps running: its log
/// shows them (replaced), and the replica is not restarted (a reader that stopped at them
/// would close the pipe, and the watchdog exits once nothing reads it).
#[tokio::test]
async fn output_that_is_not_utf8_is_logged_and_stops_nothing() {
    common::require_program("python3", "python3");
    let s = Server::start();
    let f = json!({"service": "noisy", "image": "x",
        "envProcess": "sh -c 'printf \"bad \\377\\376 bytes\\n\"; exec python3 -m http.server $PORT --bind 127.0.0.1'",
        "envVars": {"mode": "http", "upstream_url": "http://127.0.0.1:0"}});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("noisy", 1).await;
    let logged = poll(Duration::from_secs(5), || async {
        s.system_text("/system/logs?name=noisy&tail=20")
            .await
            .contains("bad \u{fffd}\u{fffd} bytes")
    })
    .await;
    assert!(
        logged,
        "{}",
        s.system_text("/system/logs?name=noisy&tail=20").await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = s.http.get(s.url("/function/noisy/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let restarts =
        r#"faastastic_replica_restarts_total{datacenter="home",function_name="noisy.openfaas-fn"}"#;
    assert_eq!(sample(&s.metrics().await, restarts), Some(0.0));
}

/// A classic process gets the whole body on its standard input whatever its size (one that
/// fits in a pipe is written at once, a larger one as the process reads), a process that
/// reads none of it still answers, and its command line is the one deployed.
#[tokio::test]
async fn classic_mode_passes_bodies_of_every_size() {
    let s = Server::start();
    for f in [
        common::echo_function("echo"),
        json!({"service":"deaf","image":"x","envProcess":"echo answered"}),
        json!({"service":"argv","image":"x","envProcess":"sh -c 'cat /proc/$$/cmdline'"}),
    ] {
        assert_eq!(s.deploy(f).await.status(), 202);
    }
    for name in ["echo", "deaf", "argv"] {
        s.wait_available(name, 1).await;
    }
    for size in [0, 5, 65_535, 65_536, 65_537, 1 << 20] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let r = s
            .http
            .post(s.url("/function/echo"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{size} bytes");
        let echoed = r.bytes().await.unwrap();
        assert!(
            echoed[..] == body[..],
            "{size} bytes: {} back",
            echoed.len()
        );
        let r = s
            .http
            .post(s.url("/function/deaf"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{size} bytes to a process that reads none");
        assert_eq!(r.text().await.unwrap(), "answered\n");
    }
    let r = s.http.post(s.url("/function/argv")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let cmdline = r.bytes().await.unwrap();
    assert!(
        cmdline.starts_with(b"sh\0-c\0cat /proc/"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
}

#[tokio::test]
async fn classic_mode_sees_request_as_environment() {
    let s = Server::start();
    let f = json!({"service":"env","image":"x","envProcess":"env","envVars":{"greeting":"hello"}});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("env", 1).await;
    let r = s
        .http
        .put(s.url("/function/env/a/b/?q=1&r=2"))
        .header("X-Call-Id", "fixed-id")
        .header("X-Custom", "yes")
        .body("body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("x-call-id").is_none(),
        "an incoming call id is not echoed"
    );
    let text = r.text().await.unwrap();
    for expected in [
        "greeting=hello",
        "Http_Method=PUT",
        "Http_Path=/a/b/",
        "Http_Query=q=1&r=2",
        "Http_X_Call_Id=fixed-id",
        "Http_X_Custom=yes",
        "Http_X_Forwarded_For=127.0.0.1:",
        "Http_X_Forwarded_Host=127.0.0.1:",
        "Http_X_Start_Time=",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    assert!(
        !text.contains("faastastic_listen"),
        "server settings do not leak"
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("keep")).await.status(), 202);
    let send = |m: Method, path: &str, body: &str| {
        s.system(m, path)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
    };
    let cases: Vec<(Method, &str, String, u16, &str)> = vec![
        (Method::POST, "/system/functions", "{not json".into(), 400, "failed to unmarshal"),
        (Method::POST, "/system/functions", "".into(), 400, "required"),
        (Method::POST, "/system/functions", r#"{"image":"x"}"#.into(), 400, "service: is required"),
        (Method::POST, "/system/functions", r#"{"service":"Bad_Name","image":"x","envProcess":"cat"}"#.into(), 400, "service:"),
        (Method::POST, "/system/functions", r#"{"service":"x"}"#.into(), 400, "image: is required"),
        (Method::POST, "/system/functions", r#"{"service":"x","image":"i","envProcess":"cat","labels":{"com.openfaas.scale.min":"two"}}"#.into(), 400, "com.openfaas.scale.min"),
        (Method::POST, "/system/functions", r#"{"service":"x","image":"i","envProcess":"cat","namespace":"ghost"}"#.into(), 400, "ghost"),
        (Method::POST, "/system/functions", r#"{"service":"x","image":"i","envProcess":"cat","labels":{"a":1}}"#.into(), 400, "labels"),
        (Method::POST, "/system/functions", format!(r#"{{"service":"{}","image":"x","envProcess":"cat"}}"#, "a".repeat(64)), 400, "longer than 63"),
        (Method::PUT, "/system/functions", "[]".into(), 400, "failed to unmarshal"),
        (Method::DELETE, "/system/functions", "".into(), 400, "required"),
        (Method::DELETE, "/system/functions", "{}".into(), 400, "functionName"),
        (Method::POST, "/system/scale-function/keep", r#"{"replicas":-1}"#.into(), 400, "replicas"),
        (Method::POST, "/system/scale-function/keep", r#"{"replicas":1.5}"#.into(), 400, "failed to unmarshal"),
        (Method::POST, "/system/scale-function/keep", r#"{"serviceName":"keep"}"#.into(), 400, "replicas: is required"),
        (Method::POST, "/system/scale-function/keep", r#"{"replicas":100000}"#.into(), 400, "limits.max_replicas"),
        (Method::POST, "/system/secrets", r#"{"value":"x"}"#.into(), 400, "name: is required"),
        (Method::POST, "/system/secrets", r#"{"name":"s","rawValue":"%%%"}"#.into(), 400, "rawValue"),
        (Method::POST, "/system/namespace/", r#"{"name":"Not Valid"}"#.into(), 400, "name:"),
        (Method::GET, "/system/function/bad%2Fname", "".into(), 400, "name:"),
        (Method::PATCH, "/system/functions", "{}".into(), 405, ""),
        (Method::GET, "/system/nothing-here", "".into(), 404, "404 page not found"),
    ];
    for (method, path, body, code, needle) in cases {
        let r = send(method.clone(), path, &body).await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, code, "{method} {path} {body} -> {text}");
        assert!(
            text.contains(needle),
            "{method} {path}: {text:?} should mention {needle:?}"
        );
    }
    // Every validation problem in one answer.
    let r = send(
        Method::POST,
        "/system/functions",
        r#"{"service":"","image":""}"#,
    )
    .await
    .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("service: is required") && text.contains("image: is required"),
        "{text}"
    );

    // Oversized system bodies: 413.
    let huge = format!(
        r#"{{"service":"big","image":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let r = send(Method::POST, "/system/functions", &huge)
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Invoke path tricks.
    for path in [
        "/function/..",
        "/function/a%2Fb",
        "/function/x..y",
        &format!("/function/{}", "a".repeat(300)),
    ] {
        let r = s.http.get(s.url(path)).send().await.unwrap();
        assert!(
            [400, 404].contains(&r.status().as_u16()),
            "{path} -> {}",
            r.status()
        );
    }
    let r = s
        .http
        .request(
            Method::from_bytes(b"PURGE").unwrap(),
            s.url("/function/keep"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    // Nothing above changed the stored state.
    let list: serde_json::Value = s.get_json("/system/functions").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "keep");
    assert_eq!(list[0]["replicas"], 1);
}

/// PIDs whose command line is exactly `argv` (joined by NULs).
fn pids_running(argv: &[&str]) -> Vec<i32> {
    let want = argv.join("\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).trim_end_matches('\0') == want)
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// The parent of process `pid`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Nothing a classic request starts outlives it: not when it answers, not when it times out,
/// not when its watchdog is killed with SIGKILL halfway through (a parent-death signal reaches
/// only the request's first process: the rest are swept from the replica's session, or go
/// with the sandbox's PID namespace); with and without the sandbox.
#[tokio::test]
async fn nothing_a_classic_request_starts_outlives_it() {
    // Sleeps of lengths only this run uses mark what the requests start; whatever a failing
    // run leaves is killed when the test ends.
    let first = 1_000_000 + (std::process::id() % 100_000) * 20;
    struct KillMarked(u32);
    impl Drop for KillMarked {
        fn drop(&mut self) {
            for n in self.0..self.0 + 20 {
                for pid in pids_running(&["sleep", &n.to_string()]) {
                    // SAFETY: kill(2) of a sleep this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
    let _cleanup = KillMarked(first);
    let mut modes = vec![("none", first)];
    if common::is_root() {
        common::require_program("bwrap", "bubblewrap");
        modes.push(("bubblewrap", first + 10));
    }
    for (sandbox, marker) in modes {
        let cfg = format!("[local]\nsandbox = \"{sandbox}\"\n");
        let s = Server::with(common::Options {
            config: Some(&cfg),
            ..Default::default()
        });
        let sleeps = |n: u32| pids_running(&["sleep", &(marker + n).to_string()]);
        assert!(
            (1..=5).all(|n| sleeps(n).is_empty()),
            "marked sleeps already run"
        );
        let gone = |ns: &'static [u32]| {
            let sleeps = &sleeps;
            async move {
                poll(Duration::from_secs(5), || async {
                    ns.iter().all(|n| sleeps(*n).is_empty())
                })
                .await
            }
        };
        let deploy = |name: &str, process: String, timeout: &str| {
            json!({"service": name, "image": "local/sh", "envProcess": process,
                   "envVars": {"exec_timeout": timeout}})
        };
        // It answers while something it started runs on.
        let f = deploy(
            "answers",
            format!(
                "sh -c 'sleep {} >/dev/null 2>&1 & echo started'",
                marker + 1
            ),
            "60s",
        );
        assert_eq!(s.deploy(f).await.status(), 202);
        s.wait_available("answers", 1).await;
        assert_eq!(s.invoke("answers", "").await, (200, "started\n".into()));
        assert!(gone(&[1]).await, "{sandbox}: left running after its answer");
        // It times out.
        let f = deploy(
            "slow",
            format!("sh -c 'sleep {} & sleep {}'", marker + 2, marker + 3),
            "1s",
        );
        assert_eq!(s.deploy(f).await.status(), 202);
        s.wait_available("slow", 1).await;
        assert_eq!(s.invoke("slow", "").await.0, 504);
        assert!(
            gone(&[2, 3]).await,
            "{sandbox}: left running after its timeout"
        );
        // Its watchdog is killed halfway through.
        let f = deploy(
            "killed",
            format!("sh -c 'sleep {} & sleep {}'", marker + 4, marker + 5),
            "60s",
        );
        assert_eq!(s.deploy(f).await.status(), 202);
        s.wait_available("killed", 1).await;
        let call = tokio::spawn({
            let (http, url) = (s.http.clone(), s.url("/function/killed"));
            async move { http.post(url).send().await.map(|r| r.status().as_u16()) }
        });
        assert!(
            poll(Duration::from_secs(10), || async {
                !sleeps(4).is_empty() && !sleeps(5).is_empty()
            })
            .await
        );
        let request = parent_of(sleeps(5)[0]).unwrap();
        let watchdog = parent_of(request).unwrap();
        let cmdline = std::fs::read(format!("/proc/{watchdog}/cmdline")).unwrap_or_default();
        assert!(
            watchdog > 1 && String::from_utf8_lossy(&cmdline).ends_with("watchdog\0"),
            "{sandbox}: process {watchdog} above the request is not a watchdog: {cmdline:?}"
        );
        // SAFETY: kill(2) on the watchdog this test's server started.
        unsafe { libc::kill(watchdog, libc::SIGKILL) };
        assert!(
            gone(&[4, 5]).await,
            "{sandbox}: left running after its watchdog was killed"
        );
        let status = call.await.unwrap();
        assert!(status.as_ref().map_or(true, |c| *c >= 500), "{status:?}");
    }
}

/// A watchdog whose server is gone exits even when its parent lives on, as a sandbox's own
/// processes can (they stand between the server and the watchdog): nothing reads its output
/// any more, and that is what it watches.
#[tokio::test]
async fn a_watchdog_nobody_listens_to_exits() {
    use std::io::BufRead;
    let mut watchdog = std::process::Command::new(common::BIN)
        .arg("watchdog")
        .env("fprocess", "cat")
        .env("faastastic_listen", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(watchdog.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");
    let pid = watchdog.id() as i32;
    assert!(alive(pid));
    drop(out);
    let gone = poll(Duration::from_secs(5), || async { !alive(pid) }).await;
    let _ = watchdog.kill();
    let _ = watchdog.wait();
    assert!(gone, "the watchdog ran on with nobody reading its output");
}

#[tokio::test]
async fn a_functions_forked_workers_stop_with_it() {
    common::require_program("python3", "python3");
    for kill_server in [false, true] {
        let mut s = Server::start();
        let port = common::free_port();
        // A distinct sleep per round marks the worker the function forks.
        let marker = if kill_server { "4243" } else { "4242" };
        let f = json!({"service":"forker","image":"x",
            "envProcess":format!("sh -c 'sleep {marker} & exec python3 -m http.server {port} --bind 127.0.0.1'"),
            "envVars":{"mode":"http","upstream_url":format!("http://127.0.0.1:{port}")}});
        assert_eq!(s.deploy(f).await.status(), 202);
        s.wait_available("forker", 1).await;
        assert_eq!(pids_running(&["sleep", marker]).len(), 1);
        if kill_server {
            s.kill();
        } else {
            let del = s
                .system(Method::DELETE, "/system/functions")
                .json(&json!({"functionName":"forker"}))
                .send()
                .await
                .unwrap();
            assert_eq!(del.status(), 202);
        }
        let gone = poll(Duration::from_secs(15), || async {
            pids_running(&["sleep", marker]).is_empty()
        })
        .await;
        assert!(
            gone,
            "a forked worker outlived its function (kill_server={kill_server})"
        );
    }
}

#[tokio::test]
async fn requests_waiting_for_a_replica_are_bounded() {
    let s = Server::with(common::Options {
        config: Some("[proxy]\nready_timeout_ms = 20000\nmax_waiting_requests = 1\n"),
        ..Default::default()
    });
    let port = common::free_port();
    let f = json!({"service":"slowstart","image":"x","envProcess":"sleep 600",
        "envVars":{"mode":"http","upstream_url":format!("http://127.0.0.1:{port}")}});
    assert_eq!(s.deploy(f).await.status(), 202);
    let first = tokio::spawn({
        let (http, url) = (s.http.clone(), s.url("/function/slowstart"));
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    });
    let waiting = poll(Duration::from_secs(10), || async {
        sample(&s.metrics().await, "faastastic_proxy_waiting_requests") == Some(1.0)
    })
    .await;
    assert!(waiting, "the first request waits for the replica");
    // The second finds the waiting room full and is answered at once, while the first waits on.
    let r = s
        .http
        .get(s.url("/function/slowstart"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(!first.is_finished(), "the first request is still held");
    first.abort();
}

#[tokio::test]
async fn a_broken_update_leaves_the_old_version_serving() {
    let s = Server::with(common::Options {
        config: Some("[local]\nstartup_timeout_secs = 1\n[proxy]\nready_timeout_ms = 200\n"),
        ..Default::default()
    });
    assert_eq!(
        s.deploy(json!({"service":"roll","image":"x","envProcess":"echo old"}))
            .await
            .status(),
        202
    );
    s.wait_available("roll", 1).await;
    let broken = |port: u16| {
        json!({"service":"roll","image":"x","envProcess":"sleep 600",
            "envVars":{"mode":"http","upstream_url":format!("http://127.0.0.1:{port}")}})
    };
    // Two broken updates in a row, and longer than the startup timeout: the old one serves.
    for _ in 0..2 {
        let put = s
            .system(Method::PUT, "/system/functions")
            .json(&broken(common::free_port()))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 202);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        assert_eq!(s.invoke("roll", "").await, (200, "old\n".to_string()));
        // Status and list count the generation that serves, not the one that never starts.
        assert_eq!(s.status("roll").await.1["availableReplicas"], 1);
        let list: serde_json::Value = s.get_json("/system/functions").await;
        assert_eq!(list[0]["availableReplicas"], 1, "{list}");
    }
    // The status says the new version is not ready, and why (its replica's last failure).
    let update = |st: serde_json::Value| {
        let dcs = st["datacenters"].as_object().cloned().unwrap_or_default();
        dcs.values().next().map(|dc| dc["update"].clone())
    };
    let explained = poll(Duration::from_secs(10), || async {
        let u = update(s.status("roll").await.1).unwrap_or_default();
        u["ready"] == false
            && u["reason"]
                .as_str()
                .is_some_and(|r| r.contains("restarting"))
    })
    .await;
    let st = s.status("roll").await.1;
    assert!(explained, "{st}");
    assert_eq!(update(st.clone()).unwrap()["replicas"], 1, "{st}");
    // A good update takes over.
    let put = s
        .system(Method::PUT, "/system/functions")
        .json(&json!({"service":"roll","image":"x","envProcess":"echo new"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);
    let switched = poll(Duration::from_secs(20), || async {
        s.invoke("roll", "").await.1 == "new\n"
    })
    .await;
    assert!(switched);
    s.wait_available("roll", 1).await;
    let st = s.status("roll").await.1;
    assert_eq!(update(st.clone()), Some(serde_json::Value::Null), "{st}");
    // Scaled, to zero, removed and deployed again: the counts follow each step.
    assert_eq!(s.scale("roll", 3).await, 202);
    s.wait_available("roll", 3).await;
    assert_eq!(s.scale("roll", 0).await, 202);
    s.wait_available("roll", 0).await;
    assert_eq!(s.remove("roll").await, 202);
    assert_eq!(
        s.deploy(json!({"service":"roll","image":"x","envProcess":"echo again"}))
            .await
            .status(),
        202
    );
    s.wait_available("roll", 1).await;
    let list: serde_json::Value = s.get_json("/system/functions").await;
    assert_eq!(list[0]["availableReplicas"], 1, "{list}");
}

#[tokio::test]
async fn http_mode_replicas_each_get_their_own_port() {
    common::require_program("python3", "python3");
    let s = Server::start();
    let f = json!({"service":"multi","image":"x",
        "envProcess":"python3 -m http.server $PORT --bind 127.0.0.1",
        "envVars":{"mode":"http","upstream_url":"http://127.0.0.1:0"},
        "labels":{"com.openfaas.scale.min":"3"}});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("multi", 3).await;
    for _ in 0..9 {
        assert_eq!(
            s.invoke("multi", "").await.0,
            501,
            "python's server answers POST with 501"
        );
    }
    let metrics = s.metrics().await;
    assert_eq!(
        sample(&metrics, r#"faastastic_replica_restarts_total{datacenter="home",function_name="multi.openfaas-fn"}"#).unwrap_or(0.0),
        0.0,
        "no replica fights another for a port: {metrics}"
    );

    // A fixed port can only run one replica: refused at deploy and at scale, with the fix named.
    let port = common::free_port();
    let fixed = |min: &str| {
        json!({"service":"fixed","image":"x",
        "envProcess":format!("python3 -m http.server {port} --bind 127.0.0.1"),
        "envVars":{"mode":"http","upstream_url":format!("http://127.0.0.1:{port}")},
        "labels":{"com.openfaas.scale.min":min}})
    };
    let r = s.deploy(fixed("2")).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("$PORT"));
    assert_eq!(s.deploy(fixed("1")).await.status(), 202);
    let r = s
        .system(Method::POST, "/system/scale-function/fixed")
        .json(&json!({"replicas": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// Scale-in drains: replicas being removed stop getting new requests first and finish what they
/// have, so repeated 4 -> 1 scale-downs under load fail no request.
#[tokio::test]
async fn repeated_scale_downs_under_load_fail_no_request() {
    let s = Server::start();
    let mut f = echo_function("drained");
    // Each request takes a little while, so scale-downs catch requests in flight.
    f["envProcess"] = json!("sh -c 'sleep 0.05; cat'");
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("drained", 1).await;
    let load = common::Load::start(&s, "drained", 60, Duration::from_secs(60));
    for round in 0..3 {
        assert_eq!(s.scale("drained", 4).await, 202);
        s.wait_available("drained", 4).await;
        tokio::time::sleep(Duration::from_millis(500)).await; // traffic on all four
        assert_eq!(s.scale("drained", 1).await, 202);
        s.wait_available("drained", 1).await;
        assert_eq!(load.failed(), 0, "a request failed in round {round}");
    }
    let failed = load.failed();
    let sent = load.stop().await;
    assert!(sent > 30, "the load ran ({sent} requests)");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across the scale-downs"
    );
}

/// A tmpfs the test mounts (this needs root), unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("faastastic-test")
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and must run as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, how: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{how}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {how} {}", self.0.display());
    }

    /// Fills the file system with one file; removing it frees the space again.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&chunk[..512]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

async fn send(req: reqwest::RequestBuilder) -> (u16, String) {
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The data directory's disk fills up: every change is refused with 507 naming the cause,
/// nothing is half-applied, the server keeps serving, and it all works again once there is
/// space (nothing stored before is lost, also across a restart).
#[tokio::test]
async fn a_full_disk_refuses_changes_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let disk = Tmpfs::mount(&data, "16m");
    let options = || common::Options {
        data_dir: Some(&data),
        ..Default::default()
    };
    let mut s = Server::with(options());
    assert_eq!(s.deploy(echo_function("kept")).await.status(), 202);
    s.wait_available("kept", 1).await;
    let secret = |s: &Server, name: &str| {
        s.system(Method::POST, "/system/secrets")
            .json(&json!({"name": name, "value": "v"}))
    };
    assert_eq!(send(secret(&s, "old")).await.0, 202);
    let alert = common::alert_payload(
        "firing",
        "d1",
        json!({"alertname": "Busy", "function_name": "kept"}),
    );

    let filler = disk.fill();
    let full = |(code, body): (u16, String), what: &str| {
        assert_eq!(code, 507, "{what}: {body}");
        assert!(body.contains("disk is full"), "{what}: {body}");
    };
    let deploy = s.deploy(echo_function("refused")).await;
    full(
        (deploy.status().as_u16(), deploy.text().await.unwrap()),
        "deploy",
    );
    full(
        send(
            s.system(Method::POST, "/system/scale-function/kept")
                .json(&json!({"serviceName": "kept", "replicas": 3})),
        )
        .await,
        "scale",
    );
    full(send(secret(&s, "new")).await, "secret");
    let (code, body) = send(s.system(Method::POST, "/system/alert").json(&alert)).await;
    assert!(
        code >= 500,
        "Alertmanager must retry a decision it could not store: {code} {body}"
    );
    assert!(body.contains("disk is full"), "{body}");

    // Nothing changed, and what was there still serves.
    assert!(s.is_alive());
    let functions: serde_json::Value = s.get_json("/system/functions").await;
    let names: Vec<&str> = functions
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(s.status("kept").await.1["replicas"], 1);
    let secrets: serde_json::Value = s.get_json("/system/secrets").await;
    assert_eq!(secrets.as_array().unwrap().len(), 1, "{secrets}");
    assert_eq!(s.invoke("kept", "still").await, (200, "still".into()));

    // Space comes back: the same requests succeed, and survive a restart.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(s.deploy(echo_function("refused")).await.status(), 202);
    let (code, body) = send(s.system(Method::POST, "/system/alert").json(&alert)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(send(secret(&s, "new")).await.0, 202);
    s.wait_available("kept", 2).await;
    s.kill();
    let s = Server::with(options());
    s.wait_available("kept", 2).await;
    s.wait_available("refused", 1).await;
    let secrets: serde_json::Value = s.get_json("/system/secrets").await;
    assert_eq!(secrets.as_array().unwrap().len(), 2, "{secrets}");
}

/// A data directory that cannot be written stops the start with its path and the cause,
/// instead of a server that fails later.
#[tokio::test]
async fn a_read_only_data_directory_is_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("ro");
    let disk = Tmpfs::mount(&mount, "16m");
    let data = mount.join("data");
    let mut s = Server::with(common::Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("kept")).await.status(), 202);
    s.kill();
    disk.remount("ro");
    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            "--no-auth",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&data.display().to_string()) && stderr.contains("Read-only file system"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Writable again: the function stored before is still there.
    disk.remount("rw");
    let s = Server::with(common::Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    s.wait_available("kept", 1).await;
}

/// A replica killed with SIGKILL under load: the only invocations that fail are those that
/// were in flight on it (its forked request processes, counted just before the kill, plus
/// two that may arrive between the count and the kill); the
/// rest go to the other replicas, and a new replica takes its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_fails_only_its_requests_in_flight() {
    let s = Server::start();
    let mut f = echo_function("busy");
    f["envProcess"] = json!("sh -c 'sleep 0.3; cat'");
    assert_eq!(s.deploy(f).await.status(), 202);
    assert_eq!(s.scale("busy", 3).await, 202);
    s.wait_available("busy", 3).await;
    let load = common::Load::start(&s, "busy", 40, Duration::from_secs(60));
    let victim = replica_pids(s.pid())[0];
    let busy = poll(Duration::from_secs(10), || async {
        !common::child_pids(victim as u32).is_empty()
    })
    .await;
    assert!(busy, "the load never reached replica {victim}");
    let in_flight = common::child_pids(victim as u32).len() as u32;
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let replaced = poll(Duration::from_secs(30), || async {
        let now = replica_pids(s.pid());
        now.len() == 3 && !now.contains(&victim) && s.available("busy").await == 3
    })
    .await;
    assert!(replaced, "no replica replaced the killed one");
    // A little more load on the three, then stop.
    let before = load.failed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = load.failed();
    let sent = load.stop().await;
    eprintln!("{failed} of {sent} failed; {in_flight} in flight on the killed replica");
    assert_eq!(
        failed, before,
        "invocations failed after the replacement was ready"
    );
    // Allowance: up to two requests may reach the replica between the count and the kill.
    assert!(
        failed <= in_flight + 2,
        "{failed} of {sent} invocations failed; {in_flight} were in flight on the killed replica"
    );
}
