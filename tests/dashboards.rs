//! Every PromQL expression of the shipped Grafana dashboard (panels, annotations, variables)
//! runs against real Prometheus scraping faastastic, with Grafana's variables filled in; any
//! query error fails, and the main panels must show the function that was invoked.

mod common;

use std::time::Duration;

use common::{echo_function, free_port, poll, require_program, Server};
use serde_json::Value;

/// Each expression with a description of where it is in the dashboard.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push((
                format!("panel {:?} target {}", panel["title"], target["refId"]),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for a in dashboard["annotations"]["list"].as_array().unwrap() {
        if let Some(expr) = a["expr"].as_str() {
            out.push((format!("annotation {:?}", a["name"]), expr.to_string()));
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        // label_values(metric, label): Grafana asks Prometheus for the metric's series.
        if let Some(def) = v["definition"].as_str() {
            let inner = def
                .trim_start_matches("label_values(")
                .trim_end_matches(')');
            let metric = inner.split(',').next().unwrap().trim();
            out.push((format!("variable {:?}", v["name"]), metric.to_string()));
        }
    }
    out
}

fn fill_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$function", ".*")
}

#[tokio::test]
async fn every_dashboard_query_runs_against_real_prometheus() {
    require_program("prometheus", "prometheus");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/dashboards/faastastic.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 10, "{exprs:?}");

    let s = Server::start();
    assert_eq!(s.deploy(echo_function("charted")).await.status(), 202);
    s.wait_available("charted", 1).await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: faastastic\n  static_configs:\n  - targets: [\"{}\"]\n",
            s.base.trim_start_matches("http://")
        ),
    )
    .unwrap();
    let _prometheus = common::spawn_quiet(
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
    );
    let query = |expr: String| async move {
        let url = format!("http://127.0.0.1:{port}/api/v1/query");
        let r = reqwest::Client::new()
            .get(url)
            .query(&[("query", expr)])
            .send()
            .await;
        match r {
            Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    };
    // Invoke while Prometheus collects a few samples, so rates have data.
    let invoked = poll(Duration::from_secs(40), || async {
        let _ = s.invoke("charted", "x").await;
        let v = query("sum(rate(gateway_function_invocation_total[1m]))".into()).await;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|x| x.parse::<f64>().ok())
            .is_some_and(|x| x > 0.0)
    })
    .await;
    assert!(invoked, "Prometheus never saw the invocations");

    let mut failures = Vec::new();
    for (where_, expr) in &exprs {
        let answer = query(fill_variables(expr)).await;
        if answer["status"] != "success" {
            failures.push(format!("{where_}: {expr}: {answer}"));
        }
    }
    for (where_, expr) in exprs.iter().take(3) {
        let answer = query(fill_variables(expr)).await;
        let shown = answer["data"]["result"].as_array().is_some_and(|r| {
            r.iter()
                .any(|s| s["metric"]["function_name"] == "charted.openfaas-fn")
        });
        if !shown {
            failures.push(format!("{where_} shows nothing for charted: {answer}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
