//! End to end with real Prometheus and real Alertmanager (Debian packages), all on loopback:
//! Prometheus scrapes faastastic's /metrics and evaluates the OpenFaaS rule (short intervals),
//! Alertmanager posts to /system/alert with basic auth; a bounded load makes replicas rise, and
//! when it stops the alert resolves and replicas step back down.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    echo_function, free_port, poll, require_program, spawn_quiet as spawn, Options, Server,
};
use serde_json::Value;

async fn http_ok(url: &str) -> bool {
    reqwest::get(url)
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

#[tokio::test]
async fn load_raises_replicas_and_quiet_brings_them_back() {
    require_program("prometheus", "prometheus");
    require_program("prometheus-alertmanager", "prometheus-alertmanager");

    let s = Server::with(Options {
        auth: true,
        config: Some(
            "[autoscale]\nup_cooldown_secs = 1\ndown_cooldown_secs = 2\nstabilization_window_secs = 3\ntick_interval_ms = 250\n",
        ),
        ..Default::default()
    });
    let mut f = echo_function("hot");
    f["labels"] =
        serde_json::json!({"com.openfaas.scale.max": "4", "com.openfaas.scale.factor": "25"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("hot", 1).await;

    let dir = tempfile::tempdir().unwrap();
    let faas = s.base.trim_start_matches("http://").to_string();
    let am_port = free_port();
    let prom_port = free_port();

    // The OpenFaaS rule, with windows short enough for a test.
    std::fs::write(
        dir.path().join("rules.yml"),
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
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
alerting:
  alertmanagers:
  - static_configs:
    - targets: ["127.0.0.1:{am_port}"]
scrape_configs:
- job_name: faastastic
  static_configs:
  - targets: ["{faas}"]
"#,
            rules = dir.path().join("rules.yml").display()
        ),
    )
    .unwrap();
    let password_file = s.data_dir.join("basic-auth-password");
    std::fs::write(
        dir.path().join("alertmanager.yml"),
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
  - url: http://{faas}/system/alert
    send_resolved: true
    http_config:
      basic_auth:
        username: admin
        password_file: {pw}
"#,
            pw = password_file.display()
        ),
    )
    .unwrap();

    let _alertmanager = spawn(
        "prometheus-alertmanager",
        &[
            format!(
                "--config.file={}",
                dir.path().join("alertmanager.yml").display()
            ),
            format!("--storage.path={}", dir.path().join("am").display()),
            format!("--web.listen-address=127.0.0.1:{am_port}"),
            "--cluster.listen-address=".to_string(),
        ],
    );
    let _prometheus = spawn(
        "prometheus",
        &[
            format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
    );
    let up = poll(Duration::from_secs(30), || async {
        http_ok(&format!("http://127.0.0.1:{am_port}/-/ready")).await
            && http_ok(&format!("http://127.0.0.1:{prom_port}/-/ready")).await
    })
    .await;
    assert!(up, "Prometheus and Alertmanager did not become ready");

    // Bounded load: about 40 requests/s for at most 60 s, stopped as soon as replicas reach 3.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, url, http) = (stop.clone(), s.url("/function/hot"), s.http.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = http.post(&url).body("x").send().await;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            sent
        })
    };
    let rose = poll(Duration::from_secs(60), || async {
        s.status("hot").await.1["replicas"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    assert!(
        rose,
        "replicas never reached 3 under load ({sent} requests sent)"
    );

    let fell = poll(Duration::from_secs(60), || async {
        s.status("hot").await.1["replicas"].as_u64() == Some(1)
    })
    .await;
    assert!(
        fell,
        "replicas did not step back down to 1 after the load stopped"
    );

    let events: Vec<Value> = s
        .get_json("/system/scale-events?function=hot&limit=100")
        .await;
    let scaled: Vec<&Value> = events.iter().filter(|e| e["outcome"] == "scaled").collect();
    assert!(
        scaled.iter().any(|e| e["direction"] == "up"
            && e["source"] == "alert"
            && e["evidence"]["alertname"] == "APIHighInvocationRate"),
        "{events:#?}"
    );
    assert!(
        scaled.iter().any(|e| e["direction"] == "down"),
        "{events:#?}"
    );
    for e in &events {
        assert!(
            !e["reason"].as_str().unwrap_or("").is_empty(),
            "every decision has a reason: {e}"
        );
    }
}
