//! Replicas that answer out of spec, on the invoke lane and on the general path
//! (`proxy.lane = false`). The replica here is a raw socket behind a `remote` datacenter: the
//! control plane's agent calls get well-formed answers, and each `/function/evil/CASE`
//! invocation gets CASE's bytes, written as the case says (late, split, then closed...).
//! For every case a first client, then innocent clients on fresh connections, must each get
//! a correct answer, a 502, or a connection closed before an answer completed: never bytes
//! the replica planted (`PLANTED`), and never another request's answer.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{poll, Server};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A whole answer the replica should never have been able to slip to anybody.
const PLANTED: &str = "HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx-planted: 1\r\n\r\nPLANTED";
const INNOCENT: &str = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninnocent";
/// How long late bytes wait after the answer: the next client comes after them.
const LATE: Duration = Duration::from_millis(40);

#[derive(Clone)]
enum Step {
    Write(Vec<u8>),
    /// The bytes one at a time, each its own segment.
    Trickle(Vec<u8>),
    Sleep(Duration),
    Close,
}

fn write(s: &str) -> Step {
    Step::Write(s.as_bytes().to_vec())
}

/// What the first client may get besides a 502 or a cut answer.
#[derive(Clone, Debug, PartialEq)]
enum Good {
    /// Only a 502 (or a cut answer) is right.
    Nothing,
    Answer(u16, &'static str),
}

#[derive(Clone)]
struct Case {
    name: &'static str,
    method: &'static str,
    steps: Vec<Step>,
    good: Good,
    /// Headers the client must not see.
    absent: &'static [&'static str],
}

fn case(name: &'static str, method: &'static str, steps: Vec<Step>, good: Good) -> Case {
    Case {
        name,
        method,
        steps,
        good,
        absent: &[],
    }
}

fn cases() -> Vec<Case> {
    use Good::*;
    let ok = Answer(200, "ok");
    let late = |answer: &str| vec![write(answer), Step::Sleep(LATE), write(PLANTED)];
    let with_planted = |answer: &str| vec![Step::Write(format!("{answer}{PLANTED}").into_bytes())];
    let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut all = vec![
        // Bytes after the answer's end, at once and a moment later.
        case("head-with-body", "HEAD", with_planted("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n"), Answer(200, "")),
        case("head-late-body", "HEAD", late("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n"), Answer(200, "")),
        case("204-with-body", "GET", with_planted("HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n"), Answer(204, "")),
        case("204-late-body", "GET", late("HTTP/1.1 204 No Content\r\n\r\n"), Answer(204, "")),
        case("304-with-body", "GET", with_planted("HTTP/1.1 304 Not Modified\r\n\r\n"), Answer(304, "")),
        case("past-length", "GET", with_planted("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), ok.clone()),
        case("past-length-late", "GET", late("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), ok.clone()),
        case("past-length-late-post", "POST", late("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), ok.clone()),
        case("after-last-chunk", "GET", with_planted(&format!("{chunked}2\r\nok\r\n0\r\n\r\n")), ok.clone()),
        case("after-last-chunk-late", "GET", late(&format!("{chunked}2\r\nok\r\n0\r\n\r\n")), ok.clone()),
        // Chunk lines a lenient client would end at a bare LF.
        case("lf-in-extension", "GET", vec![write(&format!("{chunked}2;x\n{PLANTED}\r\nok\r\n0\r\n\r\n"))], Nothing),
        case("lf-size-line", "GET", vec![write(&format!("{chunked}2\nok\r\n0\r\n\r\n"))], Nothing),
        case("lf-after-data", "GET", vec![write(&format!("{chunked}2\r\nok\n0\r\n\r\n"))], Nothing),
        case("lf-in-trailer", "GET", vec![write(&format!("{chunked}2\r\nok\r\n0\r\nx: y\n{PLANTED}\r\n\r\n"))], Nothing),
        case("empty-size-line", "GET", vec![write(&format!("{chunked}\r\n{PLANTED}"))], Nothing),
        case("oversized-chunk", "GET", vec![write(&format!("{chunked}fffffffffffffffffff\r\nok\r\n0\r\n\r\n"))], Nothing),
        case("coded-chunked", "GET", vec![write("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n7\r\nPLANTED\r\n0\r\n\r\n")], Nothing),
        case("length-list", "GET", vec![write("HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok")], Nothing),
        case("signed-length", "GET", vec![write("HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok")], Nothing),
        case("two-lengths", "GET", vec![write("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!")], Nothing),
        case("chunked-and-length", "GET", vec![write(&format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n2\r\nok\r\n0\r\n\r\n{PLANTED}"))], ok.clone()),
        case("http10-chunked", "GET", vec![write("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")], Nothing),
        case("status-below-100", "GET", vec![write("HTTP/1.1 099 Odd\r\ncontent-length: 2\r\n\r\nok")], Nothing),
        case("unasked-101", "GET", vec![write(&format!("HTTP/1.1 101 Switching Protocols\r\nupgrade: evil\r\nconnection: upgrade\r\n\r\n{PLANTED}"))], Nothing),
        case("obs-fold", "GET", vec![write("HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 2\r\n\r\nok")], Nothing),
        // Interim answers come before the final one.
        case("interim", "GET", vec![write("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")], ok.clone()),
        // Split writes at every boundary.
        case("trickled-length", "GET", vec![Step::Trickle(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())], ok.clone()),
        case("trickled-chunked", "GET", vec![Step::Trickle(format!("{chunked}1;a=b\r\no\r\n1\r\nk\r\n0\r\nx-t: 1\r\n\r\n").into_bytes())], ok.clone()),
        // Early closes at each stage.
        case("close-before-head", "GET", vec![Step::Close], Nothing),
        case("close-mid-head", "GET", vec![write("HTTP/1.1 200 OK\r\ncontent-le"), Step::Close], Nothing),
        case("close-after-head", "GET", vec![write("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), Step::Close], Nothing),
        case("close-mid-body", "GET", vec![write("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok"), Step::Close], Nothing),
        case("close-mid-chunk", "GET", vec![write(&format!("{chunked}5\r\nok")), Step::Close], Nothing),
        case("close-before-head-post", "POST", vec![Step::Close], Nothing),
        // A close after a kept-alive answer: the next request does not fail for it.
        case("close-after-answer", "GET", vec![write("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), Step::Sleep(Duration::from_millis(10)), Step::Close], ok.clone()),
        // Until the close.
        case("close-delimited", "GET", vec![write("HTTP/1.1 200 OK\r\n\r\nok"), Step::Close], ok.clone()),
    ];
    // What the replica says of the call: its own call id and start time are replaced by the
    // invocation's, anything else is relayed (see the contract's parity table).
    all.push(case(
        "answer-headers",
        "GET",
        vec![write("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-call-id: from-replica\r\nx-start-time: 1\r\nx-extra: kept\r\n\r\nok")],
        Answer(200, "ok"),
    ));
    all.push(Case {
        absent: &["x-secret", "keep-alive"],
        ..case(
            "nominated-headers",
            "GET",
            vec![write("HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret\r\nkeep-alive: timeout=5\r\nx-secret: 1\r\ncontent-length: 2\r\n\r\nok")],
            ok,
        )
    });
    all
}

/// The replica and the agent API in one raw server.
#[derive(Default)]
struct Replica {
    cases: HashMap<&'static str, Case>,
    deployed: Mutex<bool>,
    /// Requests received per case.
    received: Mutex<HashMap<String, usize>>,
    /// Cases whose steps have all been carried out (late bytes written, closes done).
    finished: Mutex<HashMap<String, usize>>,
    /// Headers of the requests received per case, lower-cased.
    seen_headers: Mutex<HashMap<String, Vec<(String, String)>>>,
}

/// Something a replica's bytes go over: a TCP stream, or TLS over one.
trait Wire: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Wire for T {}

impl Replica {
    /// The raw replica, speaking TLS with `tls` when given (a TLS datacenter).
    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> (Arc<Replica>, u16) {
        let replica = Arc::new(Replica {
            cases: cases().into_iter().map(|c| (c.name, c)).collect(),
            ..Default::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serving = replica.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let _ = conn.set_nodelay(true);
                let serving = serving.clone();
                match tls.clone() {
                    None => {
                        tokio::spawn(serving.serve(conn, false));
                    }
                    Some(acceptor) => {
                        tokio::spawn(async move {
                            if let Ok(conn) = acceptor.accept(conn).await {
                                serving.serve(conn, true).await;
                            }
                        });
                    }
                }
            }
        });
        (replica, port)
    }

    /// Serves one connection; `clean_close`: a close sends TLS's close_notify first (a plain
    /// connection is just dropped, as a crashing replica's is).
    async fn serve(self: Arc<Self>, mut conn: impl Wire, clean_close: bool) {
        let mut buf = Vec::new();
        loop {
            let Some((method, path, headers, body_len)) = read_request(&mut conn, &mut buf).await
            else {
                return;
            };
            while buf.len() < body_len {
                let mut chunk = [0u8; 4096];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..body_len);
            if path.starts_with("/agent/") {
                let answer = self.agent(&method, &path);
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            let name = path.rsplit('/').next().unwrap_or_default().to_string();
            *self
                .received
                .lock()
                .unwrap()
                .entry(name.clone())
                .or_default() += 1;
            self.seen_headers
                .lock()
                .unwrap()
                .insert(name.clone(), headers);
            let steps = match self.cases.get(name.as_str()) {
                Some(c) => c.steps.clone(),
                None => vec![write(INNOCENT)],
            };
            let mut ok = true;
            for step in steps {
                ok = match step {
                    Step::Write(bytes) => conn.write_all(&bytes).await.is_ok(),
                    Step::Trickle(bytes) => {
                        let mut ok = true;
                        for b in bytes {
                            ok &= conn.write_all(&[b]).await.is_ok();
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        ok
                    }
                    Step::Sleep(d) => {
                        tokio::time::sleep(d).await;
                        true
                    }
                    Step::Close => {
                        if clean_close {
                            let _ = conn.shutdown().await;
                        }
                        false
                    }
                };
                if !ok {
                    break;
                }
            }
            *self.finished.lock().unwrap().entry(name).or_default() += 1;
            if !ok {
                return;
            }
        }
    }

    /// How many times `case`'s steps have been carried out.
    fn finished(&self, case: &str) -> usize {
        self.finished
            .lock()
            .unwrap()
            .get(case)
            .copied()
            .unwrap_or(0)
    }

    fn agent(&self, method: &str, path: &str) -> String {
        let body = match (method, path) {
            ("GET", "/agent/v1/functions") => {
                let list = if *self.deployed.lock().unwrap() {
                    json!([{"namespace": "openfaas-fn", "name": "evil", "desired": 1, "ready": 1}])
                } else {
                    json!([])
                };
                list.to_string()
            }
            ("PUT", _) => {
                *self.deployed.lock().unwrap() = true;
                "{}".to_string()
            }
            ("DELETE", _) => {
                *self.deployed.lock().unwrap() = false;
                "{}".to_string()
            }
            _ => "{}".to_string(),
        };
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }
}

/// Reads one request head: method, path, lower-cased headers, body length.
async fn read_request(
    conn: &mut impl Wire,
    buf: &mut Vec<u8>,
) -> Option<(String, String, Vec<(String, String)>, usize)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(buf) {
            let method = req.method?.to_string();
            let path = req.path?.to_string();
            let headers = common::lower_headers(req.headers);
            let body_len = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            buf.drain(..len);
            return Some((method, path, headers, body_len));
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Everything the server sends on `conn` until it is quiet for `quiet` (or closes); and
/// whether it closed.
async fn read_until_quiet(conn: &mut TcpStream, quiet: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(quiet, conn.read(&mut chunk)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Status, lower-cased headers, body, and the bytes after the answer.
type Parsed = (u16, Vec<(String, String)>, Vec<u8>, Vec<u8>);

/// Reads until `conn` holds a complete answer (or closes), then whatever follows it within a
/// short quiet period; and whether it closed.
async fn read_answer(conn: &mut TcpStream, head_request: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while parse_answer(&out, head_request, false).is_none() {
        match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
    let (more, closed) = read_until_quiet(conn, Duration::from_millis(150)).await;
    out.extend_from_slice(&more);
    (out, closed)
}

/// One answer read strictly from `bytes`: status, lower-cased headers, body, and the bytes
/// after it; `None` when the bytes hold no complete answer.
fn parse_answer(bytes: &[u8], head_request: bool, closed: bool) -> Option<Parsed> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = resp.parse(bytes).ok()? else {
        return None;
    };
    let status = resp.code?;
    let headers = common::lower_headers(resp.headers);
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let rest = &bytes[len..];
    if head_request || status == 204 || status == 304 {
        return Some((status, headers.clone(), Vec::new(), rest.to_vec()));
    }
    if let Some(n) = header("content-length") {
        let n: usize = n.parse().ok()?;
        if rest.len() < n {
            return None;
        }
        return Some((
            status,
            headers.clone(),
            rest[..n].to_vec(),
            rest[n..].to_vec(),
        ));
    }
    if header("transfer-encoding").is_some_and(|v| v == "chunked") {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = at + rest[at..].windows(2).position(|w| w == b"\r\n")?;
            let line = std::str::from_utf8(&rest[at..line_end]).ok()?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    let end = at + rest[at..].windows(2).position(|w| w == b"\r\n")?;
                    let empty = end == at;
                    at = end + 2;
                    if empty {
                        return Some((status, headers.clone(), body, rest[at..].to_vec()));
                    }
                }
            }
            if rest.len() < at + size + 2 || &rest[at + size..at + size + 2] != b"\r\n" {
                return None;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    }
    // Delimited by the close.
    closed.then(|| (status, headers.clone(), rest.to_vec(), Vec::new()))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn request(method: &str, case: &str) -> String {
    let body = if method == "POST" {
        "content-length: 4\r\n\r\ndata"
    } else {
        "\r\n"
    };
    format!("{method} /function/evil/{case} HTTP/1.1\r\nhost: gw\r\n{body}")
}

/// What a client got: checked against what is allowed, described for the failure message.
fn check_answer(
    mode: &str,
    case: &Case,
    what: &str,
    bytes: &[u8],
    closed: bool,
    head_request: bool,
) -> Option<Vec<u8>> {
    let text = String::from_utf8_lossy(bytes);
    assert!(
        !contains(bytes, "PLANTED") && !contains(bytes, "x-planted"),
        "{mode} {}: {what} got planted bytes: {text:?}",
        case.name
    );
    match parse_answer(bytes, head_request, closed) {
        None => {
            // Cut short: acceptable only as a closed connection.
            assert!(
                closed,
                "{mode} {}: {what} got an incomplete answer on an open connection: {text:?}",
                case.name
            );
            None
        }
        Some((status, headers, body, rest)) => {
            let good = match &case.good {
                _ if status == 502 => true,
                Good::Answer(want_status, want_body) => {
                    status == *want_status && body == want_body.as_bytes()
                }
                Good::Nothing => false,
            };
            assert!(
                good,
                "{mode} {}: {what} got {status} {:?} (allowed: 502 or {:?}): {text:?}",
                case.name,
                String::from_utf8_lossy(&body),
                case.good
            );
            if status != 502 {
                for name in case.absent {
                    assert!(
                        !headers.iter().any(|(n, _)| n == name),
                        "{mode} {}: {what} got the nominated header {name}: {text:?}",
                        case.name
                    );
                }
                if status == 204 {
                    assert!(
                        !headers.iter().any(|(n, _)| n == "content-length"),
                        "{mode} {}: a 204 carries no Content-Length: {text:?}",
                        case.name
                    );
                }
            }
            Some(rest)
        }
    }
}

/// faastastic with `extra` config and one `remote` datacenter, `edge`, whose agent and only
/// replica is the raw server on `port` (over TLS trusting `ca`, when given); `evil` deployed
/// there and answering.
/// The hostile replica as a local http-mode function's own server, which invocations reach
/// without its watchdog (`local.http_direct`): a datacenter `edge` on the local platform.
async fn serve_evil_locally(extra: &str, port: u16) -> Server {
    let config = format!("{extra}[[datacenters]]\nname = \"edge\"\n");
    let s = Server::with(common::Options {
        config: Some(&config),
        ..Default::default()
    });
    let r = s
        .deploy(
            json!({"service": "evil", "image": "any/evil", "envProcess": "sleep 1000000",
            "envVars": {"mode": "http", "upstream_url": format!("http://127.0.0.1:{port}")}}),
        )
        .await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    wait_for_evil(&s).await;
    // The route is direct: the function answers with its watchdog stopped.
    assert!(
        common::answers_with_watchdog_stopped(&s, "/function/evil/innocent").await,
        "the local function is reached without its watchdog"
    );
    s
}

async fn wait_for_evil(s: &Server) {
    assert!(
        poll(Duration::from_secs(15), || async {
            s.http
                .get(s.url("/function/evil/innocent"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await,
        "the function answers"
    );
}

async fn serve_evil(extra: &str, port: u16, ca: Option<&std::path::Path>) -> Server {
    let remote = match ca {
        Some(ca) => format!(
            "url = \"https://127.0.0.1:{port}\"\nca_file = {:?}\nserver_name = \"edge.test\"\n",
            ca.display().to_string()
        ),
        None => format!("url = \"http://127.0.0.1:{port}\"\n"),
    };
    let config =
        format!("{extra}[[datacenters]]\nname = \"edge\"\nplatform = \"remote\"\n{remote}");
    let s = Server::with(common::Options {
        config: Some(&config),
        ..Default::default()
    });
    let r = s
        .deploy(json!({"service": "evil", "image": "any/evil"}))
        .await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    wait_for_evil(&s).await;
    s
}

/// A TLS acceptor for a replica named `edge.test`, and the CA that signed it.
fn tls_replica(dir: &std::path::Path) -> (tokio_rustls::TlsAcceptor, std::path::PathBuf) {
    let ca = common::tls::Ca::new(dir, "ca");
    let (cert, key) = ca.issue(dir, "edge", &["edge.test"], false);
    let acceptor = faastastic::tls::acceptor(&faastastic::tls::ListenerTls {
        cert_file: cert,
        key_file: key,
        client_ca: None,
    })
    .unwrap();
    (acceptor, ca.file)
}

/// Where the hostile replica is.
#[derive(Clone, Copy, PartialEq)]
enum Behind {
    /// A remote datacenter's agent.
    Agent,
    /// A TLS datacenter's agent (the lane hands its invocations to the general path).
    TlsAgent,
    /// A local http-mode function's server, reached without its watchdog.
    LocalFunction,
}

async fn hostile_replicas_never_reach_other_clients(lane: bool, behind: Behind) {
    let tls = behind == Behind::TlsAgent;
    let mode = match (lane, behind) {
        (_, Behind::TlsAgent) => "TLS datacenter",
        (true, Behind::LocalFunction) => "lane to a local function",
        (false, Behind::LocalFunction) => "general path to a local function",
        (true, Behind::Agent) => "lane",
        (false, Behind::Agent) => "general path",
    };
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, ca) = match tls {
        true => {
            let (acceptor, ca) = tls_replica(dir.path());
            (Some(acceptor), Some(ca))
        }
        false => (None, None),
    };
    let (replica, port) = Replica::start(acceptor).await;
    // One connection thread, so that every client meets the same upstream pool.
    let extra =
        format!("[proxy]\nlane = {lane}\nconnection_threads = 1\nupstream_timeout_secs = 5\n");
    let s = match behind {
        Behind::LocalFunction => serve_evil_locally(&extra, port).await,
        _ => serve_evil(&extra, port, ca.as_deref()).await,
    };
    let addr = s.addr();
    for case in cases() {
        let head_request = case.method == "HEAD";
        let finished_before = replica.finished(case.name);
        let before = replica
            .received
            .lock()
            .unwrap()
            .get(case.name)
            .copied()
            .unwrap_or(0);
        // The first client: the case, then an innocent request on the same connection.
        let mut first = TcpStream::connect(&addr).await.unwrap();
        first
            .write_all(request(case.method, case.name).as_bytes())
            .await
            .unwrap();
        let (bytes, closed) = read_answer(&mut first, head_request).await;
        // Everything the replica does for the case (late bytes, a close) has happened before
        // anyone asks again.
        assert!(
            poll(Duration::from_secs(10), || async {
                replica.finished(case.name) > finished_before
            })
            .await,
            "{mode} {}: the replica carried the case out",
            case.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let rest = check_answer(
            mode,
            &case,
            "the first client",
            &bytes,
            closed,
            head_request,
        );
        if let Some(rest) = rest {
            assert!(
                rest.is_empty(),
                "{mode} {}: bytes after the first answer: {:?}",
                case.name,
                String::from_utf8_lossy(&rest)
            );
        }
        if !closed {
            let again = request("POST", "innocent");
            if first.write_all(again.as_bytes()).await.is_ok() {
                let (bytes, closed) = read_answer(&mut first, false).await;
                let innocent = Case {
                    good: Good::Answer(200, "innocent"),
                    ..case.clone()
                };
                if !(bytes.is_empty() && closed) {
                    check_answer(
                        mode,
                        &innocent,
                        "the first client's next request",
                        &bytes,
                        closed,
                        false,
                    );
                }
                if case.name == "close-after-answer" {
                    assert!(
                        bytes.starts_with(b"HTTP/1.1 200"),
                        "{mode}: a POST after the replica closed an idle connection is sent afresh: {:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
            }
        }
        // Innocent clients on fresh connections, some on the pooled upstream connections.
        for i in 0..3 {
            let method = if i % 2 == 0 { "GET" } else { "POST" };
            let mut innocent = TcpStream::connect(&addr).await.unwrap();
            innocent
                .write_all(request(method, "innocent").as_bytes())
                .await
                .unwrap();
            let (bytes, closed) = read_answer(&mut innocent, false).await;
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !contains(&bytes, "PLANTED"),
                "{mode} {}: an innocent client got planted bytes: {text:?}",
                case.name
            );
            let answer = parse_answer(&bytes, false, closed);
            assert!(
                answer
                    .as_ref()
                    .is_some_and(|(status, _, body, rest)| *status == 200
                        && body == b"innocent"
                        && rest.is_empty()),
                "{mode} {}: an innocent client got {text:?}",
                case.name
            );
        }
        // A request that may not be repeated reached the replica once.
        if case.method == "POST" {
            let after = replica.received.lock().unwrap()[case.name];
            assert_eq!(
                after - before,
                1,
                "{mode} {}: a POST is never sent twice",
                case.name
            );
        }
    }

    // Refusals are counted by cause.
    let metrics = s.metrics().await;
    let refused: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("faastastic_upstream_protocol_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        refused >= 5.0,
        "{mode}: refused answers are counted: {metrics}"
    );
    assert!(
        metrics.contains(
            r#"faastastic_upstream_protocol_errors_total{cause="status",datacenter="edge",function_name="evil.openfaas-fn"}"#
        ),
        "{mode}: the status below 100 is counted by its cause"
    );
}

#[tokio::test]
async fn the_lane_refuses_hostile_answers_and_never_relays_planted_bytes() {
    hostile_replicas_never_reach_other_clients(true, Behind::Agent).await;
}

#[tokio::test]
async fn the_general_path_refuses_hostile_answers_the_same_way() {
    hostile_replicas_never_reach_other_clients(false, Behind::Agent).await;
}

/// A local http-mode function's own server is reached without its watchdog: the same
/// refusals hold on the way to it, on both paths.
#[tokio::test]
async fn a_local_function_s_hostile_answers_are_refused_the_same_way() {
    hostile_replicas_never_reach_other_clients(true, Behind::LocalFunction).await;
    hostile_replicas_never_reach_other_clients(false, Behind::LocalFunction).await;
}

#[tokio::test]
async fn a_tls_datacenter_s_hostile_answers_are_refused_the_same_way() {
    hostile_replicas_never_reach_other_clients(true, Behind::TlsAgent).await;
}

/// A connection-nominated request header is the client's hop's: it does not reach the
/// replica, and a nominated `X-Forwarded-For` gives way to the real client address.
async fn nominated_request_headers_stay_on_their_hop(lane: bool) {
    let (replica, port) = Replica::start(None).await;
    let s = serve_evil(&format!("[proxy]\nlane = {lane}\n"), port, None).await;
    let addr = s.addr();
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let local = conn.local_addr().unwrap().to_string();
    conn.write_all(
        b"GET /function/evil/nominating HTTP/1.1\r\nhost: gw\r\nconnection: keep-alive, x-secret, x-forwarded-for\r\n\
          x-secret: s3cret\r\nx-forwarded-for: 6.6.6.6\r\nx-kept: yes\r\n\r\n",
    )
    .await
    .unwrap();
    let (bytes, _) = read_until_quiet(&mut conn, Duration::from_millis(300)).await;
    assert!(
        bytes.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    let seen = replica.seen_headers.lock().unwrap()["nominating"].clone();
    let get = |name: &str| {
        seen.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert!(get("x-secret").is_empty(), "lane={lane}: {seen:?}");
    assert!(get("connection").is_empty(), "lane={lane}: {seen:?}");
    assert_eq!(get("x-kept"), ["yes"], "lane={lane}");
    assert_eq!(
        get("x-forwarded-for"),
        [local],
        "lane={lane}: the real client address"
    );
}

#[tokio::test]
async fn nominated_request_headers_stay_on_their_hop_on_both_paths() {
    nominated_request_headers_stay_on_their_hop(true).await;
    nominated_request_headers_stay_on_their_hop(false).await;
}

/// A keep-alive client that sends nothing more is closed after `limits.idle_timeout_ms`; one
/// that starts a request keeps `header_timeout_ms` from its first byte.
async fn idle_clients_are_closed(lane: bool) {
    let (_replica, port) = Replica::start(None).await;
    let s = serve_evil(
        &format!(
            "[limits]\nidle_timeout_ms = 600\nheader_timeout_ms = 3000\n[proxy]\nlane = {lane}\n"
        ),
        port,
        None,
    )
    .await;
    let addr = s.addr();
    // A client that connects and sends nothing is closed after the header timeout.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let (bytes, closed) = read_until_quiet(&mut silent, Duration::from_secs(10)).await;
    assert!(
        bytes.is_empty() && closed,
        "lane={lane}: a silent connection is closed"
    );
    // Idle after an answer: closed after the idle timeout, well before the header timeout.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(request("GET", "innocent").as_bytes())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (bytes, closed) = read_until_quiet(&mut idle, Duration::from_secs(10)).await;
    assert!(bytes.starts_with(b"HTTP/1.1 200"), "lane={lane}");
    assert!(closed, "lane={lane}: an idle connection is closed");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(2900),
        "lane={lane}: closed by the idle timeout, not the header timeout ({waited:?})"
    );
    // A request begun before the idle timeout has the header timeout to finish its head.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(request("GET", "innocent").as_bytes())
        .await
        .unwrap();
    let (bytes, _) = read_until_quiet(&mut slow, Duration::from_millis(200)).await;
    assert!(bytes.starts_with(b"HTTP/1.1 200"));
    slow.write_all(b"GET /function/evil/innocent HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    slow.write_all(b"host: gw\r\n\r\n").await.unwrap();
    let (bytes, _) = read_until_quiet(&mut slow, Duration::from_millis(500)).await;
    assert!(
        bytes.starts_with(b"HTTP/1.1 200"),
        "lane={lane}: a head begun in time finishes within the header timeout: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[tokio::test]
async fn idle_keep_alive_clients_are_closed_on_both_paths() {
    idle_clients_are_closed(true).await;
    idle_clients_are_closed(false).await;
}

/// The values of `name` among `headers`.
fn find<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The invoke contract, both ways, as a table: for each request the replica receives the same
/// headers from the lane as from the general path, and the client gets the same answer
/// headers. Values that differ by nature are normalised: a generated call id, the start time,
/// the client's port in `X-Forwarded-For`, the date.
#[tokio::test]
async fn the_lane_and_the_general_path_forward_and_answer_the_same_headers() {
    let (replica, port) = Replica::start(None).await;
    let rows: &[(&str, &str, &str, &str)] = &[
        // (row, method, case, extra request headers)
        ("plain", "GET", "innocent", ""),
        (
            "call id given",
            "GET",
            "innocent",
            "x-call-id: given-by-client\r\n",
        ),
        (
            "forwarded given",
            "GET",
            "innocent",
            "x-forwarded-for: 10.1.2.3\r\nx-forwarded-host: first.example\r\n",
        ),
        ("start time given", "GET", "innocent", "x-start-time: 5\r\n"),
        (
            "content type",
            "POST",
            "innocent",
            "content-type: application/json\r\n",
        ),
        (
            "nominated",
            "GET",
            "innocent",
            "connection: x-hop\r\nx-hop: 1\r\nx-kept: 1\r\n",
        ),
        (
            "hop-by-hop",
            "GET",
            "innocent",
            "keep-alive: timeout=5\r\nproxy-authorization: basic x\r\nte: trailers\r\n",
        ),
        (
            "agent token from the client",
            "GET",
            "innocent",
            "x-faastastic-agent-token: forged\r\n",
        ),
        (
            "replica's own call id and start time",
            "GET",
            "answer-headers",
            "",
        ),
        (
            "replica's own call id, client's kept",
            "GET",
            "answer-headers",
            "x-call-id: given-by-client\r\n",
        ),
    ];
    let normalise = |headers: Vec<(String, String)>, generated: bool| {
        let mut out: Vec<(String, String)> = headers
            .into_iter()
            .filter(|(n, _)| n != "date")
            .map(|(n, v)| {
                let v = match n.as_str() {
                    "x-call-id" if generated && v.len() == 36 => "<generated>".to_string(),
                    "x-start-time" => "<time>".to_string(),
                    "x-forwarded-for" if v.starts_with("127.0.0.1:") => {
                        "127.0.0.1:<port>".to_string()
                    }
                    _ => v,
                };
                (n, v)
            })
            .collect();
        out.sort();
        out
    };
    let mut seen_by_mode = Vec::new();
    for lane in [true, false] {
        let s = serve_evil(&format!("[proxy]\nlane = {lane}\n"), port, None).await;
        let addr = s.addr();
        let mut table = Vec::new();
        for (i, (row, method, case, extra)) in rows.iter().enumerate() {
            // A path of the row's own, so that the replica keeps each row's request apart.
            let path = if *case == "innocent" {
                format!("row{i}/innocent")
            } else {
                format!("row{i}/{case}")
            };
            let body = if *method == "POST" {
                "content-length: 2\r\n\r\n{}"
            } else {
                "\r\n"
            };
            let mut conn = TcpStream::connect(&addr).await.unwrap();
            conn.write_all(
                format!(
                    "{method} /function/evil/{path} HTTP/1.1\r\nhost: gw.example\r\n{extra}{body}"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let (bytes, closed) = read_answer(&mut conn, false).await;
            let (status, answer, _, _) = parse_answer(&bytes, false, closed).unwrap_or_else(|| {
                panic!("lane={lane} {row}: {:?}", String::from_utf8_lossy(&bytes))
            });
            assert_eq!(
                status,
                200,
                "lane={lane} {row}: {:?}",
                String::from_utf8_lossy(&bytes)
            );
            let generated = !extra.contains("x-call-id");
            let sent = replica.seen_headers.lock().unwrap()[*case].clone();
            table.push((
                *row,
                normalise(sent, generated),
                normalise(answer, generated),
            ));
        }
        seen_by_mode.push(table);
    }
    let (lane, general) = (&seen_by_mode[0], &seen_by_mode[1]);
    for ((row, sent_lane, answer_lane), (_, sent_general, answer_general)) in
        lane.iter().zip(general)
    {
        assert_eq!(
            sent_lane, sent_general,
            "{row}: what the replica receives (lane, general)"
        );
        assert_eq!(
            answer_lane, answer_general,
            "{row}: what the client gets (lane, general)"
        );
    }
    // And the contract itself, on one path (the other is the same).
    let row = |name: &str| lane.iter().find(|(r, _, _)| *r == name).unwrap();
    let (_, sent, answer) = row("plain");
    assert_eq!(find(sent, "x-call-id"), ["<generated>"]);
    assert_eq!(
        find(answer, "x-call-id"),
        ["<generated>"],
        "a generated call id is answered"
    );
    assert_eq!(find(sent, "x-forwarded-for"), ["127.0.0.1:<port>"]);
    assert_eq!(find(sent, "x-forwarded-host"), ["gw.example"]);
    assert_eq!(find(answer, "content-type"), ["text/plain"]);
    assert_eq!(find(answer, "x-start-time"), ["<time>"]);
    let (_, sent, answer) = row("call id given");
    assert_eq!(find(sent, "x-call-id"), ["given-by-client"]);
    assert!(find(answer, "x-call-id").is_empty(), "{answer:?}");
    let (_, sent, _) = row("forwarded given");
    assert_eq!(find(sent, "x-forwarded-for"), ["10.1.2.3"]);
    assert_eq!(find(sent, "x-forwarded-host"), ["first.example"]);
    let (_, sent, answer) = row("content type");
    assert_eq!(find(sent, "content-type"), ["application/json"]);
    assert_eq!(find(answer, "content-type"), ["application/json"]);
    let (_, sent, _) = row("nominated");
    assert!(find(sent, "x-hop").is_empty() && find(sent, "connection").is_empty());
    assert_eq!(find(sent, "x-kept"), ["1"]);
    let (_, sent, _) = row("hop-by-hop");
    for hop in ["keep-alive", "proxy-authorization", "te"] {
        assert!(find(sent, hop).is_empty(), "{hop}: {sent:?}");
    }
    let (_, _, answer) = row("replica's own call id and start time");
    assert_eq!(
        find(answer, "x-call-id"),
        ["<generated>"],
        "the invocation's, not the replica's"
    );
    assert_eq!(find(answer, "x-extra"), ["kept"]);
    let (_, _, answer) = row("replica's own call id, client's kept");
    assert_eq!(
        find(answer, "x-call-id"),
        ["from-replica"],
        "a call id the client gave is not answered over the replica's"
    );
}
