//! End to end with real Prometheus and real Alertmanager (Debian packages), all on loopback:
//! Prometheus scrapes faastastic's /metrics and evaluates a rule, Alertmanager posts to
//! /system/alert with basic auth, and bounded loads make replicas rise and fall.

mod common;

use std::time::{Duration, Instant};

use common::{
    echo_function, fast_alertmanager, poll, repo_file, step_rule, Load, Monitoring, Options, Server,
};
use serde_json::Value;

async fn replicas(s: &Server, name: &str) -> u64 {
    s.status(name).await.1["replicas"].as_u64().unwrap_or(0)
}

/// The webhook receiver of `rules/alertmanager.yml` as shipped, pointed at `s`.
fn shipped_alertmanager_config(s: &Server) -> String {
    let shipped = std::fs::read_to_string(repo_file("rules/alertmanager.yml")).unwrap();
    let rendered = shipped
        .replace(
            "http://127.0.0.1:8080/system/alert",
            &s.url("/system/alert"),
        )
        .replace(
            "/var/lib/faastastic/basic-auth-password",
            &s.data_dir.join("basic-auth-password").display().to_string(),
        );
    assert_ne!(
        shipped, rendered,
        "the shipped receiver URL and password file were found"
    );
    rendered
}

/// Function `hot`: max 4, steps of 25 % of max (one replica), ready.
async fn deploy_hot(s: &Server) {
    let mut f = echo_function("hot");
    f["labels"] =
        serde_json::json!({"com.openfaas.scale.max": "4", "com.openfaas.scale.factor": "25"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("hot", 1).await;
}

#[tokio::test]
async fn load_raises_replicas_and_quiet_brings_them_back() {
    let s = Server::with(Options {
        auth: true,
        config: Some(
            "[autoscale]\nup_cooldown_secs = 1\ndown_cooldown_secs = 2\nstabilization_window_secs = 3\ntick_interval_ms = 250\n",
        ),
        ..Default::default()
    });
    deploy_hot(&s).await;

    let dir = tempfile::tempdir().unwrap();
    let rules = step_rule(dir.path());
    let alertmanager = fast_alertmanager(&s);
    let _monitoring = Monitoring::start(&s, &[rules], Some(alertmanager), &[]).await;

    // Bounded load: 40 requests/s for at most 60 s, stopped as soon as replicas reach 3.
    let load = Load::start(&s, "hot", 40, Duration::from_secs(60));
    let rose = poll(Duration::from_secs(60), || async {
        replicas(&s, "hot").await >= 3
    })
    .await;
    let sent = load.stop().await;
    assert!(
        rose,
        "replicas never reached 3 under load ({sent} requests sent)"
    );

    let fell = poll(Duration::from_secs(60), || async {
        replicas(&s, "hot").await == 1
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
            && e["evidence"]["alertname"] == "APIHighInvocationRate"
            && e["reason"].as_str().unwrap_or("").contains("step up")),
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

/// The shipped rule (`rules/faastastic.rules.yml`, which carries `value` and
/// `target_per_replica`) and the shipped Alertmanager timing: a load at 8x the rule's threshold
/// takes the function from 1 to 4 replicas in one decision.
#[tokio::test]
async fn an_alert_carrying_its_value_sizes_the_function_in_one_decision() {
    let s = Server::with(Options {
        auth: true,
        config: Some("[autoscale]\ntick_interval_ms = 250\n"),
        ..Default::default()
    });
    let mut f = echo_function("sized");
    f["labels"] = serde_json::json!({"com.openfaas.scale.max": "4"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("sized", 1).await;

    // Prometheus re-sends firing alerts every second (default: every minute), so Alertmanager
    // holds the latest value when its group_wait ends.
    let _monitoring = Monitoring::start(
        &s,
        &[repo_file("rules/faastastic.rules.yml")],
        Some(shipped_alertmanager_config(&s)),
        &["--rules.alert.resend-delay=1s"],
    )
    .await;

    // The rule fires above 5 invocations/s: load at 8x that.
    let started = Instant::now();
    let load = Load::start(&s, "sized", 40, Duration::from_secs(90));
    let reached = poll(Duration::from_secs(90), || async {
        s.status("sized").await.1["availableReplicas"].as_u64() == Some(4)
    })
    .await;
    let took = started.elapsed();
    let sent = load.stop().await;
    assert!(
        reached,
        "replicas never reached 4 under load ({sent} requests sent)"
    );
    eprintln!("load start -> 4 ready replicas: {took:?}");

    let events: Vec<Value> = s
        .get_json("/system/scale-events?function=sized&limit=100")
        .await;
    let ups: Vec<&Value> = events
        .iter()
        .filter(|e| e["outcome"] == "scaled" && e["direction"] == "up")
        .collect();
    assert_eq!(ups.len(), 1, "one decision, not steps: {events:#?}");
    let up = ups[0];
    assert_eq!(
        (up["from"].as_u64(), up["to"].as_u64()),
        (Some(1), Some(4)),
        "{up:#}"
    );
    assert_eq!(up["source"], "alert");
    assert_eq!(up["evidence"]["alertname"], "FunctionHighInvocationRate");
    let reason = up["reason"].as_str().unwrap();
    assert!(reason.contains("per replica"), "{reason}");
    assert!(
        up["recommended"].as_u64().unwrap() >= 4,
        "the value asked for at least 4: {up:#}"
    );
}

/// Alertmanager is down while the rule fires: nothing reaches faastastic and nothing scales.
/// Once it is back, Prometheus re-sends the firing alert (every `--rules.alert.resend-delay`,
/// one minute by default) and the function scales up then.
#[tokio::test]
async fn alerts_fired_while_alertmanager_is_down_scale_once_it_returns() {
    let s = Server::with(Options {
        auth: true,
        config: Some("[autoscale]\nup_cooldown_secs = 1\n"),
        ..Default::default()
    });
    deploy_hot(&s).await;
    let dir = tempfile::tempdir().unwrap();
    let mut monitoring = Monitoring::start(
        &s,
        &[step_rule(dir.path())],
        Some(fast_alertmanager(&s)),
        &["--rules.alert.resend-delay=1s"],
    )
    .await;
    monitoring.kill_alertmanager();

    let load = Load::start(&s, "hot", 40, Duration::from_secs(90));
    let alerts = format!(
        "http://127.0.0.1:{}/api/v1/alerts",
        monitoring.prometheus_port
    );
    let firing = poll(Duration::from_secs(40), || async {
        let body: Value = reqwest::get(&alerts).await.unwrap().json().await.unwrap();
        body["data"]["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["state"] == "firing"))
    })
    .await;
    assert!(firing, "the rule never fired");
    assert_eq!(
        replicas(&s, "hot").await,
        1,
        "nothing can scale without Alertmanager"
    );

    monitoring.restart_alertmanager().await;
    let rose = poll(Duration::from_secs(40), || async {
        replicas(&s, "hot").await >= 2
    })
    .await;
    let sent = load.stop().await;
    assert!(
        rose,
        "no scale-up after Alertmanager returned ({sent} requests sent)"
    );
}
