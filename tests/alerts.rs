//! `/system/alert` with real Alertmanager payloads, and `/system/scale-events`: decisions,
//! reasons, cooldowns that survive a restart, bad payloads that change nothing.

mod common;

use std::time::Duration;

use common::{echo_function, poll, sample, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Posts a webhook body; returns status and JSON answer.
async fn alert(s: &Server, body: &str) -> (u16, Value) {
    let r = s
        .system(Method::POST, "/system/alert")
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn firing(function: &str, fingerprint: &str, extra: Value) -> Value {
    let mut labels = json!({"alertname": "APIHighInvocationRate", "function_name": function});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            labels[k] = v;
        }
    }
    json!({"status": "firing", "labels": labels, "annotations": {}, "startsAt": "2026-01-01T00:00:00Z",
           "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": fingerprint})
}

fn resolved(function: &str, fingerprint: &str) -> Value {
    let mut a = firing(function, fingerprint, json!({}));
    a["status"] = json!("resolved");
    a
}

fn webhook(alerts: Vec<Value>) -> String {
    json!({"version": "4", "groupKey": "{}:{alertname=\"APIHighInvocationRate\"}", "truncatedAlerts": 0,
           "status": "firing", "receiver": "scale-up", "groupLabels": {}, "commonLabels": {},
           "commonAnnotations": {}, "externalURL": "http://127.0.0.1:9093", "alerts": alerts})
    .to_string()
}

async fn events(s: &Server, query: &str) -> Vec<Value> {
    s.get_json(&format!("/system/scale-events{query}")).await
}

async fn replicas(s: &Server, name: &str) -> u64 {
    s.status(name).await.1["replicas"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn openfaas_payload_steps_up_and_explains_it() {
    let s = Server::start();
    for name in ["figlet", "nodeinfo"] {
        assert_eq!(s.deploy(echo_function(name)).await.status(), 202);
    }
    let (code, body) = alert(&s, &fixture("alertmanager-v4-openfaas.json")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["receiver"], "scale-up");
    let figlet = &body["alerts"][0];
    assert_eq!(figlet["function"], "figlet.openfaas-fn");
    assert_eq!(figlet["outcome"], "scaled");
    assert_eq!(
        (figlet["from"].as_u64(), figlet["to"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        figlet["reason"].as_str().unwrap().contains("firing"),
        "{figlet}"
    );
    // nodeinfo is resolved and already at min.
    assert_eq!(body["alerts"][1]["outcome"], "no_change", "{body}");
    assert_eq!(replicas(&s, "figlet").await, 2);
    s.wait_available("figlet", 2).await;

    // Alertmanager retrying the same delivery: a duplicate, not a second step.
    let (code, body) = alert(&s, &fixture("alertmanager-v4-openfaas.json")).await;
    assert_eq!(code, 200);
    assert_eq!(body["alerts"][0]["outcome"], "held");
    assert!(body["alerts"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("duplicate"));
    assert_eq!(replicas(&s, "figlet").await, 2);

    // The audit trail.
    let ev = events(&s, "?function=figlet").await;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[0]["outcome"], "held", "newest first");
    assert_eq!(ev[0]["reason_code"], "duplicate");
    assert_eq!(ev[1]["outcome"], "scaled");
    assert_eq!(ev[1]["reason_code"], "step_up");
    assert_eq!(ev[1]["direction"], "up");
    assert_eq!(ev[1]["datacenter"], "home");
    assert_eq!(ev[1]["evidence"]["fingerprint"], "0123456789abcdef");
    assert_eq!(ev[1]["evidence"]["alertname"], "APIHighInvocationRate");
    assert!(ev[1]["id"].as_i64().is_some());
    chrono::DateTime::parse_from_rfc3339(ev[1]["time"].as_str().unwrap()).unwrap();
    assert_eq!(events(&s, "?function=figlet&limit=1").await.len(), 1);
    assert!(events(&s, "?namespace=other").await.is_empty());

    let metrics = s.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            r#"faastastic_scale_decisions_total{datacenter="home",direction="up",function_name="figlet.openfaas-fn",outcome="scaled"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn version_3_payload_unknown_functions_and_foreign_alerts() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("figlet")).await.status(), 202);
    let (code, body) = alert(&s, &fixture("alertmanager-v3-numeric-groupkey.json")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["alerts"][0]["outcome"], "scaled");
    assert_eq!(
        body["alerts"][1]["outcome"], "ignored",
        "service_down has no function_name"
    );
    let (code, body) = alert(&s, &webhook(vec![firing("ghost", "g1", json!({}))])).await;
    assert_eq!(code, 200, "an unknown function is not worth a retry");
    assert_eq!(body["alerts"][0]["outcome"], "unknown_function");
    let (code, body) = alert(&s, &webhook(vec![])).await;
    assert_eq!((code, body["alerts"].as_array().unwrap().len()), (200, 0));
}

#[tokio::test]
async fn conflicting_signals_in_one_batch_up_wins() {
    let s = Server::start();
    let mut f = echo_function("busy");
    f["labels"] = json!({"com.openfaas.scale.max": "10", "com.openfaas.scale.factor": "20"});
    assert_eq!(s.deploy(f).await.status(), 202);
    let (code, body) = alert(
        &s,
        &webhook(vec![
            resolved("busy", "a"),
            firing("busy.openfaas-fn", "b", json!({})),
        ]),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(body["alerts"][0]["outcome"], "superseded", "{body}");
    assert_eq!(body["alerts"][1]["outcome"], "scaled");
    assert_eq!(body["alerts"][1]["to"], 3, "step = ceil(10/100*20) = 2");
    assert_eq!(replicas(&s, "busy").await, 3);
}

#[tokio::test]
async fn resolved_steps_down_gradually_to_min() {
    let s = Server::with(Options {
        config: Some(
            "[autoscale]\nup_cooldown_secs = 0\ndown_cooldown_secs = 0.3\nstabilization_window_secs = 0\ntick_interval_ms = 100\n",
        ),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("wave")).await.status(), 202);
    for fp in ["1", "2", "3"] {
        let (_, body) = alert(&s, &webhook(vec![firing("wave", fp, json!({}))])).await;
        assert_eq!(body["alerts"][0]["outcome"], "scaled", "{body}");
    }
    assert_eq!(replicas(&s, "wave").await, 4);
    // Right after the last scale-up the down cooldown holds it; ticks then step down.
    let (_, body) = alert(&s, &webhook(vec![resolved("wave", "3")])).await;
    assert_eq!(body["alerts"][0]["outcome"], "held", "{body}");
    assert!(body["alerts"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("down cooldown"));
    let at_min = poll(Duration::from_secs(20), || async {
        replicas(&s, "wave").await == 1
    })
    .await;
    assert!(at_min, "ticks keep stepping down to min");
    let downs: Vec<Value> = events(&s, "?function=wave")
        .await
        .into_iter()
        .filter(|e| e["direction"] == "down" && e["outcome"] == "scaled")
        .collect();
    let steps: Vec<(u64, u64)> = downs
        .iter()
        .rev()
        .map(|e| (e["from"].as_u64().unwrap(), e["to"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        steps,
        vec![(4, 3), (3, 2), (2, 1)],
        "one step at a time, not straight to min"
    );
    assert_eq!(downs[0]["source"], "tick");
}

#[tokio::test]
async fn resolved_to_min_reproduces_openfaas() {
    let s = Server::with(Options {
        config: Some("[autoscale]\nup_cooldown_secs = 0\ndown_cooldown_secs = 0\nstabilization_window_secs = 0\nresolved_to_min = true\n"),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("jump")).await.status(), 202);
    for fp in ["1", "2", "3"] {
        alert(&s, &webhook(vec![firing("jump", fp, json!({}))])).await;
    }
    assert_eq!(replicas(&s, "jump").await, 4);
    let (_, body) = alert(&s, &webhook(vec![resolved("jump", "3")])).await;
    assert_eq!(body["alerts"][0]["to"], 1, "{body}");
}

#[tokio::test]
async fn labels_control_the_policy_and_bad_labels_are_named() {
    let s = Server::start();
    let mut dry = echo_function("shadow");
    dry["labels"] = json!({"com.faastastic.scale.dry-run": "true"});
    assert_eq!(s.deploy(dry).await.status(), 202);
    // Malformed scaling labels are refused at deploy, each named, and nothing is stored.
    let mut bad = echo_function("badlabels");
    bad["labels"] = json!({"com.openfaas.scale.factor": "0", "com.openfaas.scale.zero-duration": "1e20", "com.openfaas.scale.min": "100000"});
    let r = s.deploy(bad.clone()).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    for label in [
        "com.openfaas.scale.factor",
        "com.openfaas.scale.zero-duration",
        "limits.max_replicas",
    ] {
        assert!(text.contains(label), "{label} missing in {text}");
    }
    assert_eq!(s.status("badlabels").await.0, 404);
    // Labels that parse but contradict each other (min 1 by default, max 0) hold its alerts.
    bad["labels"] = json!({"com.openfaas.scale.max": "0"});
    assert_eq!(s.deploy(bad).await.status(), 202);
    let (code, body) = alert(
        &s,
        &webhook(vec![
            firing("shadow", "s", json!({})),
            firing("badlabels", "b", json!({})),
            firing("shadow", "t", json!({"scale_action": "sideways"})),
        ]),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(body["alerts"][0]["outcome"], "dry_run", "{body}");
    assert_eq!(body["alerts"][0]["to"], 2);
    assert_eq!(replicas(&s, "shadow").await, 1, "a dry run changes nothing");
    assert_eq!(body["alerts"][1]["outcome"], "held");
    assert!(
        body["alerts"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("com.openfaas.scale.max"),
        "{body}"
    );
    assert_eq!(body["alerts"][2]["outcome"], "invalid");
    assert!(body["alerts"][2]["reason"]
        .as_str()
        .unwrap()
        .contains("scale_action"));

    // An explicit count from alert labels, clamped to max.
    let (_, body) = alert(
        &s,
        &webhook(vec![firing(
            "badlabels",
            "c",
            json!({"scale_action": "to", "replicas": "3"}),
        )]),
    )
    .await;
    assert_eq!(
        body["alerts"][0]["outcome"], "held",
        "labels are still invalid: {body}"
    );
}

#[tokio::test]
async fn bad_payloads_are_rejected_and_change_nothing() {
    let s = Server::with(Options {
        config: Some("[limits]\nmax_alert_body_bytes = 4096\n"),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("steady")).await.status(), 202);
    for (body, needle) in [
        ("", "A body is required"),
        ("{not json", "Unable to parse alert"),
        (r#"{"alerts":"many"}"#, "Unable to parse alert"),
        (
            r#"{"alerts":[{"labels":{"function_name":5}}]}"#,
            "Unable to parse alert",
        ),
    ] {
        let (code, answer) = alert(&s, body).await;
        assert_eq!(code, 400, "{body}");
        assert!(
            answer.as_str().unwrap_or("").contains(needle),
            "{body}: {answer}"
        );
    }
    let huge = webhook(
        (0..100)
            .map(|i| firing("steady", &format!("f{i}"), json!({})))
            .collect(),
    );
    let (code, _) = alert(&s, &huge).await;
    assert_eq!(code, 413);
    let r = s.http.get(s.url("/system/alert")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(replicas(&s, "steady").await, 1);
    assert!(events(&s, "").await.is_empty());
    let bad = s
        .system(Method::GET, "/system/scale-events?limit=0")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn cooldown_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "[autoscale]\nup_cooldown_secs = 600\n";
    let mut s = Server::with(Options {
        data_dir: Some(&data),
        config: Some(config),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("cool")).await.status(), 202);
    let (_, body) = alert(&s, &webhook(vec![firing("cool", "1", json!({}))])).await;
    assert_eq!(body["alerts"][0]["outcome"], "scaled");
    s.kill();
    let s = Server::with(Options {
        data_dir: Some(&data),
        config: Some(config),
        ..Default::default()
    });
    let (_, body) = alert(&s, &webhook(vec![firing("cool", "2", json!({}))])).await;
    assert_eq!(body["alerts"][0]["outcome"], "held", "{body}");
    assert!(body["alerts"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("up cooldown"));
    // The same delivery as before the restart is recognised as a duplicate.
    let (_, body) = alert(&s, &webhook(vec![firing("cool", "1", json!({}))])).await;
    assert!(
        body["alerts"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("duplicate"),
        "{body}"
    );
    assert_eq!(replicas(&s, "cool").await, 2);
    assert_eq!(events(&s, "?function=cool.openfaas-fn").await.len(), 3);
}

/// `[events]` bounds the audit trail: at start (and hourly) each function keeps its newest
/// `max_per_function` events, and the decisions they record still hold.
#[tokio::test]
async fn the_audit_trail_is_pruned_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = Server::with(Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("kept")).await.status(), 202);
    for (i, n) in [2, 3, 1, 4].into_iter().enumerate() {
        assert_eq!(s.scale("kept", n).await, 202, "scale {i}");
    }
    let before = events(&s, "?function=kept.openfaas-fn").await;
    assert!(before.len() >= 4, "{before:?}");
    s.kill();
    let log = dir.path().join("serve.log");
    let s = Server::with(Options {
        data_dir: Some(&data),
        config: Some("[events]\nmax_per_function = 2\n"),
        stderr_log: Some(&log),
        env: &[("RUST_LOG", "info")],
        ..Default::default()
    });
    // Logged once both kinds of events are done.
    let line = format!("removed={}", before.len() - 2);
    let logged = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("audit trail pruned") && l.contains(&line))
    };
    let pruned = poll(Duration::from_secs(10), || async { logged() }).await;
    assert!(pruned, "{}", std::fs::read_to_string(&log).unwrap());
    let after = events(&s, "?function=kept.openfaas-fn").await;
    // The newest two, as they were.
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[..], before[..2]);
    assert_eq!(replicas(&s, "kept").await, 4);
}

#[tokio::test]
async fn alert_auth_basic_or_bearer() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "am-token\n").unwrap();
    let config = format!(
        "[autoscale]\nalert_bearer_token_file = \"{}\"\n",
        token.display()
    );
    let s = Server::with(Options {
        auth: true,
        config: Some(&config),
        ..Default::default()
    });
    let body = webhook(vec![]);
    let post = || s.http.post(s.url("/system/alert")).body(body.clone());
    assert_eq!(post().send().await.unwrap().status(), 401);
    assert_eq!(
        post().bearer_auth("wrong").send().await.unwrap().status(),
        401
    );
    assert_eq!(
        post()
            .bearer_auth("am-token")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let basic = post()
        .basic_auth(&s.user, s.password.as_deref())
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    // The alert token opens nothing else.
    let r = s
        .http
        .get(s.url("/system/functions"))
        .bearer_auth("am-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn racing_webhooks_lose_no_update() {
    let s = Server::with(Options {
        config: Some("[autoscale]\nup_cooldown_secs = 0\n"),
        ..Default::default()
    });
    let mut f = echo_function("race");
    f["labels"] = json!({"com.openfaas.scale.max": "20", "com.openfaas.scale.factor": "5"});
    assert_eq!(s.deploy(f).await.status(), 202);
    // Ten deliveries at once, each a different alert: ten steps of one, none lost.
    let sends = (0..10).map(|i| {
        let body = webhook(vec![firing("race", &format!("fp{i}"), json!({}))]);
        let s = &s;
        async move { alert(s, &body).await }
    });
    let answers = futures::future::join_all(sends).await;
    for (code, body) in &answers {
        assert_eq!(*code, 200);
        assert_eq!(body["alerts"][0]["outcome"], "scaled", "{body}");
    }
    assert_eq!(replicas(&s, "race").await, 11);
    let mut steps: Vec<(u64, u64)> = events(&s, "?function=race")
        .await
        .iter()
        .map(|e| (e["from"].as_u64().unwrap(), e["to"].as_u64().unwrap()))
        .collect();
    steps.sort();
    assert_eq!(
        steps,
        (1..=10).map(|n| (n, n + 1)).collect::<Vec<_>>(),
        "serial per function"
    );
}

#[tokio::test]
async fn idle_functions_that_opt_in_scale_to_zero_and_wake_on_invocation() {
    let s = Server::with(Options {
        config: Some(
            "[autoscale]\ntick_interval_ms = 100\ndown_cooldown_secs = 0\n[[autoscale.policies]]\nmatch = \"sleepy.*\"\nscale_to_zero = true\nzero_idle_secs = 1\n",
        ),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("sleepy")).await.status(), 202);
    let mut by_label = echo_function("napper");
    by_label["labels"] =
        json!({"com.openfaas.scale.zero": "true", "com.openfaas.scale.zero-duration": "1s"});
    assert_eq!(s.deploy(by_label).await.status(), 202);
    assert_eq!(s.deploy(echo_function("awake")).await.status(), 202);
    s.wait_available("sleepy", 1).await;
    assert_eq!(s.invoke("sleepy", "hi").await.0, 200);
    for name in ["sleepy", "napper"] {
        let zero = poll(Duration::from_secs(20), || async {
            replicas(&s, name).await == 0
        })
        .await;
        assert!(zero, "{name} did not scale to zero when idle");
    }
    assert_eq!(
        replicas(&s, "awake").await,
        1,
        "no opt-in, no scale to zero"
    );
    let ev = events(&s, "?function=sleepy").await;
    assert_eq!(ev[0]["source"], "idle", "{ev:?}");
    assert_eq!(
        (ev[0]["from"].as_u64(), ev[0]["to"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(ev[0]["reason"].as_str().unwrap().contains("no invocation"));
    assert_eq!(ev[0]["reason_code"], "scale_to_zero");
    // The next invocation is held until a replica is ready, then served.
    assert_eq!(
        s.invoke("sleepy", "wake up").await,
        (200, "wake up".to_string())
    );
}

#[tokio::test]
async fn a_redeployed_function_starts_with_a_fresh_autoscaler_state() {
    let s = Server::with(Options {
        config: Some("[autoscale]\nup_cooldown_secs = 600\n"),
        ..Default::default()
    });
    for round in 0..2 {
        assert_eq!(s.deploy(echo_function("again")).await.status(), 202);
        let (_, body) = alert(&s, &webhook(vec![firing("again", "same", json!({}))])).await;
        assert_eq!(
            body["alerts"][0]["outcome"], "scaled",
            "round {round}: {body}"
        );
        let del = s
            .system(Method::DELETE, "/system/functions")
            .json(&json!({"functionName": "again"}))
            .send()
            .await
            .unwrap();
        assert_eq!(del.status(), 202);
    }
}

fn sized(function: &str, fingerprint: &str, value: &str) -> Value {
    let mut a = firing(function, fingerprint, json!({}));
    a["annotations"] = json!({"value": value, "target_per_replica": "5"});
    a
}

#[tokio::test]
async fn an_alert_with_its_value_is_sized_and_a_stale_one_is_held() {
    let s = Server::with(Options {
        config: Some(
            "[autoscale]\nup_cooldown_secs = 0\ntick_interval_ms = 100\nstaleness_window_secs = 2\n",
        ),
        ..Default::default()
    });
    for name in ["steady", "gone"] {
        let mut f = echo_function(name);
        f["labels"] = json!({"com.openfaas.scale.max": "6"});
        assert_eq!(s.deploy(f).await.status(), 202);
        s.wait_available(name, 1).await;
    }

    // "gone" had traffic once and none since; "steady" gets 20/s, four replicas' worth.
    assert_eq!(s.invoke("gone", "x").await.0, 200);
    let load = common::Load::start(&s, "steady", 20, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(2500)).await; // let the counters cover the window

    let (code, body) = alert(
        &s,
        &webhook(vec![
            sized("steady", "aaa", "22.5"),
            sized("gone", "bbb", "40"),
        ]),
    )
    .await;
    load.stop().await;
    assert_eq!(code, 200, "{body}");
    let steady = &body["alerts"][0];
    assert_eq!(steady["outcome"], "scaled", "{body:#}");
    assert_eq!(steady["to"], 5, "ceil(22.5 / 5): {body:#}");
    let gone = &body["alerts"][1];
    assert_eq!(gone["outcome"], "held", "{body:#}");
    assert!(
        gone["reason"]
            .as_str()
            .unwrap()
            .contains("load already gone"),
        "{body:#}"
    );
    assert_eq!(replicas(&s, "gone").await, 1);
    let held = events(&s, "?function=gone").await;
    assert_eq!(held[0]["clamps"], json!(["max", "load_gone"]), "{held:#?}");
    assert_eq!(held[0]["reason_code"], "load_gone");

    // A value that is not a number is named, and changes nothing.
    let (code, body) = alert(&s, &webhook(vec![sized("gone", "ccc", "+Inf")])).await;
    assert_eq!(code, 200);
    assert_eq!(body["alerts"][0]["outcome"], "invalid", "{body:#}");
    assert!(body["alerts"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("value"));
    assert_eq!(replicas(&s, "gone").await, 1);
}

async fn post_json(s: &Server, path: &str, body: &str) -> (u16, Value) {
    let r = s
        .system(Method::POST, path)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn pause_holds_decisions_survives_a_restart_and_resume_changes_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "[autoscale]\nup_cooldown_secs = 600\n";
    let mut s = Server::with(Options {
        data_dir: Some(&data),
        config: Some(config),
        ..Default::default()
    });
    for f in ["batch", "other"] {
        assert_eq!(s.deploy(echo_function(f)).await.status(), 202);
    }
    let (code, body) = post_json(
        &s,
        "/system/autoscaling/pause",
        r#"{"function": "batch", "reason": "nightly batch window"}"#,
    )
    .await;
    assert_eq!((code, &body["changed"]), (200, &json!(true)), "{body}");
    let status = s.status("batch").await.1;
    assert_eq!(
        status["autoscalingPaused"]["reason"], "nightly batch window",
        "{status}"
    );
    assert!(s.status("other").await.1.get("autoscalingPaused").is_none());

    // Paused: the alert is explained and held, and starts no cooldown.
    let (_, body) = alert(&s, &webhook(vec![firing("batch", "1", json!({}))])).await;
    assert_eq!(body["alerts"][0]["outcome"], "held", "{body}");
    assert!(body["alerts"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("autoscaling paused (this function)"));
    assert_eq!(replicas(&s, "batch").await, 1);
    let held = events(&s, "?function=batch").await;
    assert_eq!(held[0]["clamps"], json!(["paused"]), "{held:#?}");

    // The pause is stored: it holds after a restart too.
    s.kill();
    let s = Server::with(Options {
        data_dir: Some(&data),
        config: Some(config),
        ..Default::default()
    });
    let listed: Value = s.get_json("/system/autoscaling").await;
    assert_eq!(
        listed["paused"][0]["scope"], "batch.openfaas-fn",
        "{listed}"
    );
    let (_, body) = alert(&s, &webhook(vec![firing("batch", "2", json!({}))])).await;
    assert_eq!(body["alerts"][0]["outcome"], "held", "{body}");

    // Resumed: the next alert scales at once, as if the pause had never been (no cooldown).
    let (code, body) =
        post_json(&s, "/system/autoscaling/resume", r#"{"function": "batch"}"#).await;
    assert_eq!((code, &body["changed"]), (200, &json!(true)), "{body}");
    let (code, body) =
        post_json(&s, "/system/autoscaling/resume", r#"{"function": "batch"}"#).await;
    assert_eq!((code, &body["changed"]), (200, &json!(false)), "{body}");
    let (_, body) = alert(&s, &webhook(vec![firing("batch", "3", json!({}))])).await;
    assert_eq!(body["alerts"][0]["outcome"], "scaled", "{body}");
    // The function's own trail shows when it was paused and resumed.
    let trail = events(&s, "?function=batch").await;
    let outcomes: Vec<&str> = trail
        .iter()
        .filter(|e| e["source"] == "operator")
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["resumed", "paused"], "{trail:#?}");
    assert!(trail
        .iter()
        .filter(|e| e["source"] == "operator")
        .all(|e| e["function"] == "batch" && e["namespace"] == "openfaas-fn"));
    // They change nothing, and say so with the replicas the function had (1 then).
    assert!(
        trail
            .iter()
            .filter(|e| e["source"] == "operator")
            .all(|e| e["from"] == 1 && e["to"] == 1),
        "{trail:#?}"
    );

    // Pausing everything holds every function; resuming everything lifts it.
    let (code, _) = post_json(&s, "/system/autoscaling/pause", "").await;
    assert_eq!(code, 200);
    let (_, body) = alert(&s, &webhook(vec![firing("other", "4", json!({}))])).await;
    assert!(body["alerts"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("(all functions)"));
    assert_eq!(post_json(&s, "/system/autoscaling/resume", "").await.0, 200);
    let (_, body) = alert(&s, &webhook(vec![firing("other", "5", json!({}))])).await;
    assert_eq!(body["alerts"][0]["outcome"], "scaled", "{body}");

    // Operator actions are in the audit trail; bad requests are named.
    let all = events(&s, "").await;
    assert!(all
        .iter()
        .any(|e| e["outcome"] == "paused" && e["source"] == "operator"));
    assert!(all.iter().any(|e| e["outcome"] == "resumed"));
    let (code, body) = post_json(&s, "/system/autoscaling/pause", r#"{"function": "ghost"}"#).await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = post_json(&s, "/system/autoscaling/pause", r#"{"function": 7}"#).await;
    assert_eq!(code, 400);
}

/// Shadow mode computes and records decisions but changes nothing, not even cooldowns: turned
/// off, the function scales as if it had never been on.
#[tokio::test]
async fn shadow_mode_leaves_no_trace_in_the_engine() {
    let s = Server::with(Options {
        config: Some("[autoscale]\nup_cooldown_secs = 600\n"),
        ..Default::default()
    });
    let mut f = echo_function("shadow");
    f["labels"] = json!({"com.faastastic.scale.shadow": "true"});
    assert_eq!(s.deploy(f.clone()).await.status(), 202);
    let (_, body) = alert(&s, &webhook(vec![firing("shadow", "1", json!({}))])).await;
    assert_eq!(body["alerts"][0]["outcome"], "dry_run", "{body}");
    assert_eq!(
        (
            body["alerts"][0]["from"].as_u64(),
            body["alerts"][0]["to"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(replicas(&s, "shadow").await, 1);
    f["labels"] = json!({});
    assert_eq!(s.update(&f).await, 202);
    let (_, body) = alert(&s, &webhook(vec![firing("shadow", "1", json!({}))])).await;
    assert_eq!(
        body["alerts"][0]["outcome"], "scaled",
        "neither a cooldown nor the shadow delivery holds it: {body}"
    );
    assert_eq!(replicas(&s, "shadow").await, 2);
}

/// A hold alert (`scale_action: hold`) keeps replicas from going down while it fires; it does
/// not stop scale-ups.
#[tokio::test]
async fn a_hold_alert_keeps_replicas_up_until_it_resolves() {
    let s = Server::with(Options {
        config: Some("[autoscale]\ndown_cooldown_secs = 0\nstabilization_window_secs = 0\n"),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("batchy")).await.status(), 202);
    assert_eq!(s.scale("batchy", 4).await, 202);
    let hold = firing("batchy", "h1", json!({"scale_action": "hold"}));
    let (_, body) = alert(&s, &webhook(vec![hold.clone()])).await;
    assert_eq!(body["alerts"][0]["outcome"], "no_change", "{body}");
    // A step-down in the same payload as a renewed hold, and on its own: both held.
    let down = firing("batchy", "d1", json!({"scale_action": "down"}));
    let (_, body) = alert(&s, &webhook(vec![down.clone(), hold.clone()])).await;
    assert_eq!(body["alerts"][0]["outcome"], "held", "{body}");
    assert!(body["alerts"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("hold alert"));
    assert_eq!(replicas(&s, "batchy").await, 4);
    // Scale-ups still happen during a hold (the README's Operating table and Autoscaling
    // section say so both).
    let up = firing("batchy", "u1", json!({}));
    let (_, body) = alert(&s, &webhook(vec![up])).await;
    assert_eq!(body["alerts"][0]["outcome"], "scaled", "{body}");
    assert_eq!(replicas(&s, "batchy").await, 5);
    // The hold resolves: the next step-down goes through.
    let mut released = hold.clone();
    released["status"] = json!("resolved");
    let (_, body) = alert(&s, &webhook(vec![released])).await;
    assert!(
        body["alerts"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("released"),
        "{body}"
    );
    let down = firing("batchy", "d2", json!({"scale_action": "down"}));
    let (_, body) = alert(&s, &webhook(vec![down])).await;
    assert_eq!(body["alerts"][0]["outcome"], "scaled", "{body}");
    assert!(replicas(&s, "batchy").await < 5);
}

/// A manual scale stays within the function's min and max unless it says `override`, and is
/// in the audit trail either way.
#[tokio::test]
async fn manual_scale_obeys_min_and_max_unless_overridden() {
    let s = Server::start();
    let mut f = echo_function("bounded");
    f["labels"] = json!({"com.openfaas.scale.min": "2", "com.openfaas.scale.max": "3"});
    assert_eq!(s.deploy(f).await.status(), 202);
    let post = |body: Value| {
        let req = s
            .system(Method::POST, "/system/scale-function/bounded")
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (code, text) = post(json!({"serviceName": "bounded", "replicas": 5})).await;
    assert_eq!(code, 400, "{text}");
    assert!(
        text.contains("outside 2..3") && text.contains("override"),
        "{text}"
    );
    let (code, text) = post(json!({"serviceName": "bounded", "replicas": 1})).await;
    assert_eq!(code, 400, "{text}");
    assert_eq!(replicas(&s, "bounded").await, 2, "nothing changed");
    assert_eq!(
        post(json!({"serviceName": "bounded", "replicas": 3}))
            .await
            .0,
        202
    );
    assert_eq!(
        post(json!({"serviceName": "bounded", "replicas": 0}))
            .await
            .0,
        202,
        "scale to zero is allowed"
    );
    let (code, _) = post(json!({"serviceName": "bounded", "replicas": 5, "override": true})).await;
    assert_eq!(code, 202);
    assert_eq!(replicas(&s, "bounded").await, 5);
    let trail = events(&s, "?function=bounded").await;
    assert_eq!(trail[0]["source"], "manual");
    assert!(
        trail[0]["reason"].as_str().unwrap().contains("override"),
        "{trail:#?}"
    );
    assert_eq!(trail.iter().filter(|e| e["source"] == "manual").count(), 3);
    // A pause stops autoscaling, not the operator.
    let (code, _) = post_json(
        &s,
        "/system/autoscaling/pause",
        r#"{"function": "bounded"}"#,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        post(json!({"serviceName": "bounded", "replicas": 2}))
            .await
            .0,
        202
    );
    assert_eq!(replicas(&s, "bounded").await, 2);
    let trail = events(&s, "?function=bounded").await;
    assert_eq!(
        (&trail[0]["source"], &trail[0]["outcome"]),
        (&json!("manual"), &json!("scaled")),
        "{trail:#?}"
    );
}

/// One definition of min: `[autoscale] default_min` and a matching `[[autoscale.policies]]`
/// entry set the count a function starts with and the count it wakes to, as the engine reads
/// them; a wake from zero is an audited decision naming the invocation that woke it, and a
/// pause holds it.
#[tokio::test]
async fn the_configured_min_applies_at_deploy_and_wake_and_every_wake_is_audited() {
    let s = Server::with(Options {
        config: Some(
            "[autoscale]\ndefault_min = 2\n[[autoscale.policies]]\nmatch = \"pol-*\"\nmin = 3\n",
        ),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("plain")).await.status(), 202);
    assert_eq!(s.deploy(echo_function("pol-a")).await.status(), 202);
    let mut labelled = echo_function("pol-b");
    labelled["labels"] = json!({"com.openfaas.scale.min": "4"});
    assert_eq!(s.deploy(labelled).await.status(), 202);
    assert_eq!(replicas(&s, "plain").await, 2, "default_min at deploy");
    assert_eq!(replicas(&s, "pol-a").await, 3, "the policy's min at deploy");
    assert_eq!(replicas(&s, "pol-b").await, 4, "the label over the policy");

    for name in ["dormant", "asleep"] {
        let mut f = echo_function(name);
        f["labels"] = json!({"com.faastastic.scale.initial": "0"});
        assert_eq!(s.deploy(f).await.status(), 202);
        assert_eq!(replicas(&s, name).await, 0);
    }
    let woken = s
        .http
        .post(s.url("/function/dormant"))
        .header("X-Call-Id", "call-that-woke-it")
        .body("wake")
        .send()
        .await
        .unwrap();
    assert_eq!(woken.status(), 200);
    assert_eq!(woken.text().await.unwrap(), "wake");
    assert_eq!(replicas(&s, "dormant").await, 2, "woken to default_min");
    let ev = events(&s, "?function=dormant").await;
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(ev[0]["source"], "wake", "{ev:#?}");
    assert_eq!(
        (ev[0]["from"].as_u64(), ev[0]["to"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(ev[0]["outcome"], "scaled");
    assert_eq!(ev[0]["evidence"]["call_id"], "call-that-woke-it", "{ev:#?}");
    assert!(
        ev[0]["evidence"]["waiting"].as_u64().unwrap() >= 1,
        "{ev:#?}"
    );
    assert!(
        ev[0]["reason"]
            .as_str()
            .unwrap()
            .contains("woken from zero"),
        "{ev:#?}"
    );

    // A pause holds the wake: the invocation is answered at once with why, nothing starts.
    let (code, _) = post_json(
        &s,
        "/system/autoscaling/pause",
        r#"{"function": "asleep", "reason": "maintenance"}"#,
    )
    .await;
    assert_eq!(code, 200);
    let (code, text) = s.invoke("asleep", "wake").await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("autoscaling paused"), "{text}");
    assert_eq!(replicas(&s, "asleep").await, 0);
    post_json(
        &s,
        "/system/autoscaling/resume",
        r#"{"function": "asleep"}"#,
    )
    .await;
    assert_eq!(s.invoke("asleep", "now").await, (200, "now".to_string()));
    assert_eq!(replicas(&s, "asleep").await, 2);
}

/// The count a function starts with may come from the configuration: it is checked as a
/// label's would be (the server's limit, each platform's rules), and `default_min = 0` does
/// not deploy functions dormant. A function whose stored labels a later configuration refuses
/// is still woken, to its labels' min.
#[tokio::test]
async fn the_configured_min_is_checked_at_deploy_and_a_refused_policy_still_wakes() {
    let s = Server::with(Options {
        config: Some("[autoscale]\ndefault_min = 2\n"),
        ..Default::default()
    });
    let mut fixed = echo_function("fixed");
    fixed["envVars"] = json!({"mode": "http", "upstream_url": "http://127.0.0.1:5999"});
    let r = s.deploy(fixed).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("names a fixed port"), "{text}");
    drop(s);
    let s = Server::with(Options {
        config: Some("[autoscale]\ndefault_min = 2\n[limits]\nmax_replicas = 1\n"),
        ..Default::default()
    });
    let r = s.deploy(echo_function("over")).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("limits.max_replicas"), "{text}");
    drop(s);
    let s = Server::with(Options {
        config: Some("[autoscale]\ndefault_min = 0\n"),
        ..Default::default()
    });
    assert_eq!(s.deploy(echo_function("one")).await.status(), 202);
    assert_eq!(
        replicas(&s, "one").await,
        1,
        "only the label deploys dormant"
    );
    drop(s);

    // Deployed dormant with min 3; then a policy entry caps it at 2, which its labels break.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = Server::with(Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    let mut f = echo_function("capped");
    f["labels"] = json!({"com.openfaas.scale.min": "3", "com.faastastic.scale.initial": "0"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.kill();
    let s = Server::with(Options {
        data_dir: Some(&data),
        config: Some("[[autoscale.policies]]\nmatch = \"capped.*\"\nmax = 2\n"),
        ..Default::default()
    });
    assert_eq!(s.invoke("capped", "up").await, (200, "up".to_string()));
    assert_eq!(replicas(&s, "capped").await, 3);
}
