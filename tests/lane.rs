//! The invoke lane on the wire: pipelined requests on one client connection, large and
//! chunked answers relayed whole and in order, request bodies and queries forwarded, and a
//! connection handed to the general server mid-way (an API call, a chunked upload) keeps
//! answering in order; `proxy.lane = false` answers the same.

mod common;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::routing::{any, get};
use common::{poll, Server};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIG: usize = 300_000;

/// The function's own HTTP server (the replica reaches it through `upstream_url`).
async fn start_upstream() -> u16 {
    let app = axum::Router::new()
        .route("/big", get(|| async { vec![b'x'; BIG] }))
        .route(
            "/chunked",
            get(|| async {
                let pieces =
                    (0..50).map(|i| Ok::<_, std::io::Error>(Bytes::from(format!("piece {i};"))));
                Body::from_stream(futures::stream::iter(pieces))
            }),
        )
        .route(
            "/echo",
            any(|req: Request| async move {
                let head = format!(
                    "{} {} call-id={} forwarded-host={}",
                    req.method(),
                    req.uri(),
                    req.headers().contains_key("x-call-id"),
                    req.headers()
                        .get("x-forwarded-host")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default(),
                );
                let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                    .await
                    .unwrap();
                format!("{head} body={}", String::from_utf8_lossy(&body))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// One answer read off a raw connection: status, lower-cased headers, decoded body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    assert!(
        n > 0,
        "the connection closed early; read so far: {}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// Reads the next answer from `stream`, keeping unread bytes in `buf`.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Answer {
    let (len, status, headers) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = resp.parse(buf).unwrap() {
            let headers = common::lower_headers(resp.headers);
            break (len, resp.code.unwrap(), headers);
        }
        fill(stream, buf).await;
    };
    buf.drain(..len);
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = answer.header("content-length") {
        let n: usize = n.parse().unwrap();
        while buf.len() < n {
            fill(stream, buf).await;
        }
        answer.body = buf.drain(..n).collect();
    } else {
        assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(stream, buf).await;
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&buf[..line_end])
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap(),
                16,
            )
            .unwrap();
            while buf.len() < line_end + 2 + size + 2 {
                fill(stream, buf).await;
            }
            answer
                .body
                .extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    }
    answer
}

async fn deploy_upstream_function(s: &Server, upstream: u16) {
    let r = s
        .deploy(json!({
            "service": "web",
            "image": "local/web",
            "envProcess": "sleep 600",
            "envVars": {"mode": "http", "upstream_url": format!("http://127.0.0.1:{upstream}")},
        }))
        .await;
    assert_eq!(r.status(), 202);
    s.wait_available("web", 1).await;
    assert!(
        poll(Duration::from_secs(10), || async {
            s.http
                .get(s.url("/function/web/echo"))
                .send()
                .await
                .unwrap()
                .status()
                == 200
        })
        .await,
        "the function answers"
    );
}

async fn pipelined_requests_and_hand_offs_answer_in_order(lane: bool) {
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let config = format!("[proxy]\nlane = {lane}\n");
    let s = Server::with(common::Options {
        config: Some(&config),
        env: &[("RUST_LOG", "faastastic=debug")],
        stderr_log: Some(&log),
        ..Default::default()
    });
    deploy_upstream_function(&s, upstream).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let handed_off = |conn: &TcpStream| {
        let peer = format!("peer={}", conn.local_addr().unwrap());
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .any(|l| l.contains(&peer) && l.contains("handed from the invoke lane"))
    };

    let counted_before = invocation_counts(&s).await;

    // Invocations only: the lane serves them all, in order.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let requests = "GET /function/web/big HTTP/1.1\r\nHost: gw.example\r\n\r\n\
         GET /function/web/chunked HTTP/1.1\r\nHost: gw.example\r\n\r\n\
         POST /function/web/echo?q=1 HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 5\r\n\r\nhello\
         HEAD /function/web/big HTTP/1.1\r\nHost: gw.example\r\n\r\n\
         GET /function/web/echo HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n";
    conn.write_all(requests.as_bytes()).await.unwrap();
    let mut buf = Vec::new();

    let big = read_answer(&mut conn, &mut buf).await;
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), BIG);
    assert!(big.body.iter().all(|b| *b == b'x'));
    assert!(big.header("x-call-id").is_some_and(|v| v.len() == 36));
    assert!(big.header("x-start-time").is_some());
    let date = big.header("date").expect("a date header");
    let date = httpdate::parse_http_date(date).expect("an HTTP date");
    let skew = std::time::SystemTime::now()
        .duration_since(date)
        .unwrap_or_default();
    assert!(skew < Duration::from_secs(60), "the date is now");

    let chunked = read_answer(&mut conn, &mut buf).await;
    assert_eq!(chunked.status, 200);
    let expected: String = (0..50).map(|i| format!("piece {i};")).collect();
    assert_eq!(String::from_utf8(chunked.body).unwrap(), expected);

    let echo = read_answer(&mut conn, &mut buf).await;
    assert_eq!(echo.status, 200);
    assert_eq!(
        String::from_utf8(echo.body).unwrap(),
        "POST /echo?q=1 call-id=true forwarded-host=gw.example body=hello"
    );

    let head = read_answer_head_only(&mut conn, &mut buf).await;
    assert_eq!(head.status, 200);

    let last = read_answer(&mut conn, &mut buf).await;
    assert_eq!(last.status, 200);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(buf.is_empty(), "nothing after the last answer");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
        .await
        .expect("the server closes after `Connection: close`")
        .unwrap();
    assert_eq!(closed, 0);
    assert!(!handed_off(&conn), "the lane served every invocation");

    // An API call and a chunked upload mid-connection: the general server takes over and
    // answers in order.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let requests = "POST /function/web/echo HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 2\r\n\r\nhi\
         GET /system/info HTTP/1.1\r\nHost: gw.example\r\n\r\n\
         POST /function/web/echo HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
         GET /function/web/echo HTTP/1.1\r\nHost: gw.example\r\n\r\n";
    conn.write_all(requests.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let first = read_answer(&mut conn, &mut buf).await;
    assert_eq!(
        String::from_utf8(first.body).unwrap(),
        "POST /echo call-id=true forwarded-host=gw.example body=hi"
    );
    let info = read_answer(&mut conn, &mut buf).await;
    assert_eq!(info.status, 200, "the API answers on the same connection");
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert!(info["provider"].is_object(), "{info}");
    let upload = read_answer(&mut conn, &mut buf).await;
    assert_eq!(upload.status, 200);
    assert_eq!(
        String::from_utf8(upload.body).unwrap(),
        "POST /echo call-id=true forwarded-host=gw.example body=abc"
    );
    let after = read_answer(&mut conn, &mut buf).await;
    assert_eq!(after.status, 200);
    assert_eq!(handed_off(&conn), lane, "handed over at the API call");

    // Unknown functions keep their answer whichever path reads them.
    let missing = s.http.get(s.url("/function/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-openfaas-internal"], "proxy");
    // Eight invocations answered 200 above, whichever path served them: each counted once
    // in every series and in the function list.
    let counted = invocation_counts(&s).await;
    let delta: Vec<f64> = counted
        .iter()
        .zip(&counted_before)
        .map(|(after, before)| after - before)
        .collect();
    assert_eq!(
        delta, [8.0; 4],
        "started, total, seconds, list: {counted:?}"
    );
}

/// `web`'s invocations as the started counter, the 200 counter, the 200 duration count and
/// the function list's `invocationCount` give them.
async fn invocation_counts(s: &Server) -> [f64; 4] {
    let text = s.metrics().await;
    let series = |name: &str, labels: &str| {
        common::sample(&text, &format!("{name}{{{labels}}}")).unwrap_or(0.0)
    };
    let answered = r#"code="200",datacenter="home",function_name="web.openfaas-fn""#;
    let list: serde_json::Value = s.get_json("/system/functions").await;
    let listed = list
        .as_array()
        .and_then(|l| l.iter().find(|f| f["name"] == "web"))
        .and_then(|f| f["invocationCount"].as_f64())
        .unwrap_or(0.0);
    [
        series(
            "gateway_function_invocation_started",
            r#"function_name="web.openfaas-fn""#,
        ),
        series("gateway_function_invocation_total", answered),
        series("gateway_functions_seconds_count", answered),
        listed,
    ]
}

/// A HEAD answer has a head only (its `Content-Length` describes the GET).
async fn read_answer_head_only(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Answer {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = resp.parse(buf).unwrap() {
            let status = resp.code.unwrap();
            buf.drain(..len);
            return Answer {
                status,
                headers: Vec::new(),
                body: Vec::new(),
            };
        }
        fill(stream, buf).await;
    }
}

#[tokio::test]
async fn the_lane_relays_pipelined_invocations_and_hands_other_requests_over() {
    pipelined_requests_and_hand_offs_answer_in_order(true).await;
}

#[tokio::test]
async fn without_the_lane_the_general_server_answers_the_same() {
    pipelined_requests_and_hand_offs_answer_in_order(false).await;
}
