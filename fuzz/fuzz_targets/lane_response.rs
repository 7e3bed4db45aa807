//! The invoke lane's reading of a replica's answer, against hyper's HTTP/1.1 client on the same
//! bytes. The first input byte picks the request (`HEAD` when odd, else `GET`); the rest is
//! what the replica answers.
//!
//! - Whatever hyper refuses, the lane refuses too (the lane may refuse more: it is stricter
//!   about chunk sizes, lengths and transfer codings).
//! - Whatever the lane relays, hyper reads the replica's bytes to the same status, body,
//!   trailers and end-to-end headers, and reads the lane's relayed bytes to the same again.
//! - The relayed bytes are exactly one answer: an answer written after them is read as the
//!   next one (unless the body runs to the close).
//! - Bytes after the answer keep the upstream connection out of the pool.

#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An answer appended after the lane's relayed bytes: it must be read as the next answer.
const SENTINEL: &[u8] = b"HTTP/1.1 299 Sentinel\r\ncontent-length: 8\r\n\r\nsentinel";

/// What hyper's client makes of an answer.
#[derive(Debug, PartialEq)]
struct Read {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// Headers that describe the hop or the framing, or that the lane writes itself: left out of
/// the comparison.
fn end_to_end(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let nominated: Vec<Vec<u8>> = headers
        .get_all("connection")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        // Connection options, not header names.
        .filter(|t| t != b"close" && t != b"keep-alive")
        .collect();
    let mut kept: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !matches!(
                n,
                "connection"
                    | "keep-alive"
                    | "proxy-authenticate"
                    | "proxy-authorization"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "upgrade"
                    | "content-length"
                    | "content-type"
                    | "date"
                    | "x-call-id"
                    | "x-start-time"
            ) && !nominated.iter().any(|t| t == n.as_bytes())
        })
        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
        .collect();
    kept.sort();
    kept
}

fn pairs(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    all.sort();
    all
}

/// hyper's client sending `methods` one after the other, each answered with its segment of
/// `answers` once its request has arrived (the last one followed by the close); stops at the
/// first error.
fn hyper_reads(answers: &[&[u8]], methods: &[Method]) -> Vec<Result<Read, String>> {
    let answers: Vec<Vec<u8>> = answers.iter().map(|a| a.to_vec()).collect();
    let methods = methods.to_vec();
    runtime().block_on(async move {
        let (client_side, mut replica_side) = tokio::io::duplex(1 << 20);
        let replica = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in answers {
                // The request's head (they have no body).
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    match replica_side.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = seen
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("found")
                    + 4;
                seen.drain(..end);
                if replica_side.write_all(&answer).await.is_err() {
                    return;
                }
            }
            let _ = replica_side.shutdown().await;
            // Stay open for reading, so the client's writes do not fail.
            let mut sink = [0u8; 1024];
            while matches!(replica_side.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let io = hyper_util::rt::TokioIo::new(client_side);
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(pair) => pair,
            Err(e) => return vec![Err(e.to_string())],
        };
        let driver = tokio::spawn(conn);
        let mut reads = Vec::new();
        for method in methods {
            if sender.ready().await.is_err() {
                reads.push(Err("connection closed".to_string()));
                break;
            }
            let request = Request::builder()
                .method(method)
                .uri("/")
                .header("host", "replica")
                .body(Empty::<Bytes>::new())
                .expect("a valid request");
            let read = async {
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let mut body = Vec::new();
                let mut trailers = None;
                let mut incoming = response.into_body();
                while let Some(frame) = incoming.frame().await {
                    let frame = frame.map_err(|e| e.to_string())?;
                    match frame.into_data() {
                        Ok(data) => body.extend_from_slice(&data),
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                trailers = Some(pairs(&t));
                            }
                        }
                    }
                }
                Ok::<_, String>(Read {
                    status,
                    headers: end_to_end(&headers),
                    body,
                    trailers,
                })
            };
            let result = read.await;
            let failed = result.is_err();
            reads.push(result);
            if failed {
                break;
            }
        }
        drop(sender);
        driver.abort();
        replica.abort();
        reads
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, answer)) = data.split_first() else {
        return;
    };
    let head_request = pick & 1 == 1;
    let method = if head_request {
        Method::HEAD
    } else {
        Method::GET
    };
    let lane = faastastic::lane::relay_whole(answer, head_request);
    let direct = hyper_reads(&[answer], std::slice::from_ref(&method))
        .into_iter()
        .next()
        .expect("one read");
    let (relayed, direct) = match (lane, direct) {
        (Err(_), _) => return,
        (Ok(relayed), Err(e)) => panic!(
            "the lane relayed an answer hyper refuses ({e}): {:?}\nrelayed: {:?}",
            String::from_utf8_lossy(answer),
            String::from_utf8_lossy(&relayed.bytes)
        ),
        (Ok(relayed), Ok(direct)) => {
            assert_eq!(relayed.status, direct.status);
            (relayed, direct)
        }
    };
    // The relayed bytes, then the sentinel for a second request unless the body runs to the
    // close.
    let mut answers = vec![&relayed.bytes[..]];
    let mut methods = vec![method];
    if !relayed.close_delimited {
        answers.push(SENTINEL);
        methods.push(Method::GET);
    }
    let mut reads = hyper_reads(&answers, &methods).into_iter();
    let again = reads.next().expect("one read");
    assert_eq!(
        again.as_ref(),
        Ok(&direct),
        "the client reads the relayed answer as the replica's: {:?}\nrelayed: {:?}",
        String::from_utf8_lossy(answer),
        String::from_utf8_lossy(&relayed.bytes)
    );
    if !relayed.close_delimited {
        let next = reads.next().expect("a second read");
        assert!(
            next.as_ref()
                .is_ok_and(|r| r.status == 299 && r.body == b"sentinel"),
            "the relayed bytes hold exactly one answer: {next:?}\nreplica: {:?}\nrelayed: {:?}",
            String::from_utf8_lossy(answer),
            String::from_utf8_lossy(&relayed.bytes)
        );
    }
    // An answer that hyper reads with bytes left after it is not followed by another
    // request on its connection.
    let mut probe = answer.to_vec();
    probe.extend_from_slice(SENTINEL);
    if let Ok(more) = faastastic::lane::relay_whole(&probe, head_request) {
        if !more.close_delimited {
            assert!(
                !more.reusable,
                "bytes after an answer keep its connection out of the pool"
            );
        }
    }
});
