//! Grafana annotations, tested against a receiver that checks Grafana's documented contract
//! for `POST /api/annotations` (Grafana itself cannot be installed here): path, method, bearer
//! token, JSON content type, `time` as epoch milliseconds, `tags` as strings, `text`; and
//! Grafana failing or hanging (retried, bounded, dropped with a metric, scaling never waits).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{echo_function, poll, sample, Options, Server};
use serde_json::{json, Value};

#[derive(Default)]
struct Receiver {
    /// Answer 503 to this many requests first.
    fail_first: usize,
    /// Never answer (Grafana hanging).
    hang: bool,
    requests: usize,
    accepted: Vec<Value>,
    violations: Vec<String>,
}

async fn annotations(
    State(r): State<Arc<Mutex<Receiver>>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let hang = {
        let mut r = r.lock().unwrap();
        r.requests += 1;
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some("Bearer grafana-token")
        {
            r.violations.push("missing or wrong bearer token".into());
        }
        if !headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
        {
            r.violations.push("content type is not JSON".into());
        }
        match serde_json::from_str::<Value>(&body) {
            Ok(v) => {
                let time_ok = v["time"].as_i64().is_some_and(|t| t > 1_600_000_000_000);
                let tags_ok = v["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().all(Value::is_string));
                if !time_ok || !tags_ok || !v["text"].is_string() {
                    r.violations.push(format!("bad annotation body {v}"));
                }
                if r.fail_first > 0 {
                    r.fail_first -= 1;
                    return (StatusCode::SERVICE_UNAVAILABLE, "down".into());
                }
                if !r.hang {
                    r.accepted.push(v);
                }
            }
            Err(e) => r.violations.push(format!("not JSON: {e}")),
        }
        r.hang
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    (
        StatusCode::OK,
        r#"{"message":"Annotation added","id":1}"#.into(),
    )
}

async fn start_receiver(receiver: Receiver) -> (String, Arc<Mutex<Receiver>>) {
    let state = Arc::new(Mutex::new(receiver));
    let app = axum::Router::new()
        .route("/api/annotations", post(annotations))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

fn config(dir: &std::path::Path, url: &str, extra: &str) -> String {
    let token = dir.join("grafana-token");
    std::fs::write(&token, "grafana-token\n").unwrap();
    format!(
        "[autoscale]\nup_cooldown_secs = 0\n[grafana]\nurl = \"{url}\"\ntoken_file = \"{}\"\n{extra}",
        token.display()
    )
}

async fn fire(s: &Server, function: &str, fingerprint: &str) -> Value {
    let body = json!({"version": "4", "status": "firing", "receiver": "r", "alerts": [
        {"status": "firing", "labels": {"alertname": "A", "function_name": function},
         "startsAt": "2026-01-01T00:00:00Z", "fingerprint": fingerprint}]});
    s.http
        .post(s.url("/system/alert"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn every_scale_is_annotated_and_retried_when_grafana_fails() {
    let (url, receiver) = start_receiver(Receiver {
        fail_first: 2,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, "");
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    // Every result's series is there at zero before the first annotation.
    let metrics = s.metrics().await;
    for result in ["sent", "failed", "dropped"] {
        let series = format!(r#"faastastic_grafana_annotations_total{{result="{result}"}}"#);
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}");
    }
    assert_eq!(s.deploy(echo_function("annotated")).await.status(), 202);
    let answer = fire(&s, "annotated", "a").await;
    assert_eq!(answer["alerts"][0]["outcome"], "scaled");
    let delivered = poll(Duration::from_secs(20), || async {
        !receiver.lock().unwrap().accepted.is_empty()
    })
    .await;
    assert!(delivered, "the annotation arrives after two 503s");
    {
        let r = receiver.lock().unwrap();
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.requests, 3, "two failures, then delivered");
        let a = &r.accepted[0];
        let tags: Vec<&str> = a["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        for tag in [
            "faastastic",
            "scale-up",
            "function:annotated.openfaas-fn",
            "datacenter:home",
        ] {
            assert!(tags.contains(&tag), "{tag} missing from {tags:?}");
        }
        assert!(a["text"].as_str().unwrap().contains("1 → 2"), "{a}");
        assert!(
            a["text"].as_str().unwrap().contains("firing"),
            "the reason travels: {a}"
        );
    }
    assert_eq!(
        sample(
            &s.metrics().await,
            r#"faastastic_grafana_annotations_total{result="sent"}"#
        ),
        Some(1.0)
    );

    // Shadow mode: annotated as what would happen, tagged "shadow".
    let mut f = echo_function("shadowed");
    f["labels"] = json!({"com.faastastic.scale.shadow": "true"});
    assert_eq!(s.deploy(f).await.status(), 202);
    let answer = fire(&s, "shadowed", "b").await;
    assert_eq!(answer["alerts"][0]["outcome"], "dry_run", "{answer}");
    let delivered = poll(Duration::from_secs(20), || async {
        receiver.lock().unwrap().accepted.len() == 2
    })
    .await;
    assert!(delivered);
    let r = receiver.lock().unwrap();
    let a = &r.accepted[1];
    assert!(
        a["tags"].as_array().unwrap().contains(&json!("shadow")),
        "{a}"
    );
    assert!(
        a["text"]
            .as_str()
            .unwrap()
            .starts_with("would scale (shadow mode)"),
        "{a}"
    );
}

#[tokio::test]
async fn a_hanging_grafana_never_slows_scaling_and_the_queue_is_bounded() {
    let (url, receiver) = start_receiver(Receiver {
        hang: true,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, "queue_capacity = 1\ntimeout_ms = 60000\n");
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    let mut f = echo_function("busy");
    f["labels"] = json!({"com.openfaas.scale.max": "20", "com.openfaas.scale.factor": "5"});
    assert_eq!(s.deploy(f).await.status(), 202);
    // Five scale-ups while Grafana hangs on the first annotation: every webhook is answered.
    for i in 0..5 {
        let answer = fire(&s, "busy", &format!("fp{i}")).await;
        assert_eq!(answer["alerts"][0]["outcome"], "scaled", "{answer}");
    }
    assert_eq!(s.status("busy").await.1["replicas"], 6);
    // One in flight, one queued, the rest dropped and counted.
    let dropped = poll(Duration::from_secs(10), || async {
        sample(
            &s.metrics().await,
            r#"faastastic_grafana_annotations_total{result="dropped"}"#,
        )
        .is_some_and(|d| d >= 3.0)
    })
    .await;
    assert!(dropped, "{}", s.metrics().await);
    let stuck = poll(Duration::from_secs(10), || async {
        receiver.lock().unwrap().requests == 1
    })
    .await;
    assert!(stuck, "the worker is stuck on one request");
}
