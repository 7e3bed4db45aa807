//! Query policies: the internal source (no Prometheus needed) and real Prometheus, including
//! Prometheus going away and coming back.

mod common;

use std::time::Duration;

use common::{echo_function, free_port, poll, require_program, sample, Load, Options, Server};
use serde_json::{json, Value};

async fn replicas(s: &Server, name: &str) -> u64 {
    s.status(name).await.1["replicas"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn internal_source_tracks_a_target_rate() {
    let s = Server::with(Options {
        config: Some(
            r#"
[autoscale]
up_cooldown_secs = 0
down_cooldown_secs = 1
stabilization_window_secs = 1
[[autoscale.queries]]
name = "own-rate"
source = "internal"
window_secs = 2
target = 10
interval_ms = 200
"#,
        ),
        ..Default::default()
    });
    // The policy's error series is there at zero before any read fails, for rate().
    assert_eq!(
        sample(
            &s.metrics().await,
            r#"faastastic_policy_source_errors_total{policy="own-rate"}"#
        ),
        Some(0.0)
    );
    let mut f = echo_function("tracked");
    f["labels"] = json!({"com.openfaas.scale.max": "4"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("tracked", 1).await;
    let load = Load::start(&s, "tracked", 50, Duration::from_secs(90));
    let up = poll(Duration::from_secs(30), || async {
        replicas(&s, "tracked").await == 4
    })
    .await;
    load.stop().await;
    assert!(
        up,
        "about 40 invocations/s at a target of 10 per replica needs 4"
    );
    let down = poll(Duration::from_secs(30), || async {
        replicas(&s, "tracked").await == 1
    })
    .await;
    assert!(down, "no load: back to min after the window");
    let events: Vec<Value> = s.get_json("/system/scale-events?function=tracked").await;
    let up_event = events
        .iter()
        .find(|e| e["direction"] == "up" && e["outcome"] == "scaled")
        .expect("a scale-up event");
    assert_eq!(up_event["source"], "query:own-rate");
    assert!(
        up_event["evidence"]["value"].as_f64().unwrap() > 10.0,
        "{up_event}"
    );
    assert!(up_event["evidence"]["why"]
        .as_str()
        .unwrap()
        .contains("target 10"));
    assert!(
        events.iter().all(|e| e["outcome"] != "no_change"),
        "periodic evaluations record only what they change: {events:#?}"
    );
}

/// On the shipped defaults (a target and nothing else: 10 s window read every 2 s, the 2 s
/// short window every 500 ms, 5 s up cooldown), a step load after idle seconds reaches the
/// count it needs through a burst, in at most two scale-ups and without waiting out the up
/// cooldown between them. (The time it takes is measured in the reaction benchmark.)
#[tokio::test]
async fn a_step_load_on_the_defaults_is_met_in_at_most_two_decisions() {
    let s = Server::with(Options {
        config: Some(
            r#"
[[autoscale.queries]]
name = "own-rate"
source = "internal"
target = 10
"#,
        ),
        ..Default::default()
    });
    let mut f = echo_function("stepped");
    f["labels"] = json!({"com.openfaas.scale.max": "6"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("stepped", 1).await;
    // Idle for longer than the window's first readings, then about 55/s: 6 replicas' worth.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load = Load::start(&s, "stepped", 55, Duration::from_secs(60));
    let up = poll(Duration::from_secs(20), || async {
        replicas(&s, "stepped").await == 6
    })
    .await;
    load.stop().await;
    let events: Vec<Value> = s.get_json("/system/scale-events?function=stepped").await;
    let ups: Vec<&Value> = events
        .iter()
        .filter(|e| e["direction"] == "up" && e["outcome"] == "scaled")
        .collect();
    assert!(up, "about 55/s at a target of 10 needs 6: {ups:#?}");
    assert!(ups.len() <= 2, "{} scale-ups: {ups:#?}", ups.len());
    assert!(
        ups.iter().any(|e| e["reason_code"] == "burst"),
        "the short window starts a burst: {ups:#?}"
    );
    // A second step inside the 5 s up cooldown went ahead, and says so.
    let times: Vec<chrono::DateTime<chrono::Utc>> = ups
        .iter()
        .map(|e| e["time"].as_str().unwrap().parse().unwrap())
        .collect();
    if let ([later, earlier], [reason, _]) = (&times[..], &ups[..]) {
        let apart = (*later - *earlier).to_std().unwrap();
        let text = reason["reason"].as_str().unwrap();
        if apart < Duration::from_secs(5) {
            assert!(text.contains("into the 5s up cooldown"), "{text}");
        }
    }
}

fn prometheus(config: &std::path::Path, data: &std::path::Path, port: u16) -> common::Proc {
    common::spawn_quiet(
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", data.display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
    )
}

#[tokio::test]
async fn prometheus_query_scales_holds_while_it_is_down_and_resumes() {
    require_program("prometheus", "prometheus");
    let prom_port = free_port();
    let config = format!(
        r#"
[prometheus]
url = "http://127.0.0.1:{prom_port}"
timeout_ms = 1000
[autoscale]
up_cooldown_secs = 0
down_cooldown_secs = 1
stabilization_window_secs = 2
[[autoscale.queries]]
name = "rps"
query = 'sum by (function_name) (rate(gateway_function_invocation_total[3s]))'
target = 10
interval_ms = 500
"#
    );
    let s = Server::with(Options {
        config: Some(&config),
        ..Default::default()
    });
    let mut f = echo_function("queried");
    f["labels"] = json!({"com.openfaas.scale.max": "4"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("queried", 1).await;

    let dir = tempfile::tempdir().unwrap();
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: faastastic\n  static_configs:\n  - targets: [\"{}\"]\n",
            s.base.trim_start_matches("http://")
        ),
    )
    .unwrap();
    let tsdb = dir.path().join("tsdb");
    let prom = prometheus(&prom_config, &tsdb, prom_port);
    let ready = poll(Duration::from_secs(30), || async {
        reqwest::get(format!("http://127.0.0.1:{prom_port}/-/ready"))
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    })
    .await;
    assert!(ready, "Prometheus did not start");

    let load = Load::start(&s, "queried", 50, Duration::from_secs(90));
    let up = poll(Duration::from_secs(40), || async {
        replicas(&s, "queried").await == 4
    })
    .await;
    assert!(up, "the query path scales to 4");

    // Prometheus goes away: hold, one event, source_up 0. (It may already have been counted
    // down once, before Prometheus had started.)
    let outages = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["outcome"] == "source_unavailable")
            .count()
    };
    let before = outages(&s.get_json::<Vec<Value>>("/system/scale-events").await);
    drop(prom);
    let down = poll(Duration::from_secs(20), || async {
        sample(
            &s.metrics().await,
            r#"faastastic_policy_source_up{policy="rps"}"#,
        ) == Some(0.0)
    })
    .await;
    assert!(down, "faastastic_policy_source_up goes to 0");
    load.stop().await;
    // Several evaluations later, still one outage event and no scale-down.
    let seen_failures = poll(Duration::from_secs(10), || async {
        outages(&s.get_json::<Vec<Value>>("/system/scale-events").await) == before + 1
    })
    .await;
    assert!(seen_failures);
    tokio::time::sleep(Duration::from_millis(1500)).await; // three evaluation intervals
    let events: Vec<Value> = s.get_json("/system/scale-events").await;
    assert_eq!(
        outages(&events),
        before + 1,
        "one event per outage: {events:#?}"
    );
    assert_eq!(
        replicas(&s, "queried").await,
        4,
        "held while the source is down"
    );

    // Back: scaling resumes (no load now, so back to min).
    let _prom = prometheus(&prom_config, &tsdb, prom_port);
    let resumed = poll(Duration::from_secs(40), || async {
        replicas(&s, "queried").await == 1
    })
    .await;
    assert!(resumed, "scaling resumes when Prometheus is back");
    let events: Vec<Value> = s.get_json("/system/scale-events").await;
    assert!(
        events.iter().any(|e| e["outcome"] == "source_recovered"),
        "{events:#?}"
    );
    assert_eq!(
        sample(
            &s.metrics().await,
            r#"faastastic_policy_source_up{policy="rps"}"#
        ),
        Some(1.0)
    );
}

/// A self-signed certificate for 127.0.0.1 made with openssl: (cert, key) paths.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    require_program("openssl", "openssl");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    (cert, key)
}

/// Prometheus behind TLS and basic auth: with the CA and the password the query policy reads
/// it; without the CA it is a source outage that names the certificate problem.
async fn up(s: &Server) -> Option<f64> {
    sample(
        &s.metrics().await,
        r#"faastastic_policy_source_up{policy="tls"}"#,
    )
}

#[tokio::test]
async fn prometheus_over_tls_with_basic_auth() {
    require_program("prometheus", "prometheus");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  faastastic: {hash}\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("password"), "s3cret\n").unwrap();
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(&prom_config, "global:\n  scrape_interval: 1s\n").unwrap();
    let port = free_port();
    let _prom = common::spawn_quiet(
        "prometheus",
        &[
            format!("--config.file={}", prom_config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            format!("--web.config.file={}", web.display()),
        ],
    );
    let server = |trust: bool| {
        let ca = if trust {
            format!("ca_file = \"{}\"\n", cert.display())
        } else {
            String::new()
        };
        format!(
            "[prometheus]\nurl = \"https://127.0.0.1:{port}\"\ntimeout_ms = 1000\nbasic_auth_user = \"faastastic\"\nbasic_auth_password_file = \"{}\"\n{ca}[[autoscale.queries]]\nname = \"tls\"\nquery = 'vector(1)'\ntarget = 10\ninterval_ms = 200\n",
            dir.path().join("password").display()
        )
    };
    let (trusted, untrusted) = (server(true), server(false));
    let good = Server::with(Options {
        config: Some(&trusted),
        ..Default::default()
    });
    let bad = Server::with(Options {
        config: Some(&untrusted),
        ..Default::default()
    });
    assert!(
        poll(Duration::from_secs(30), || async {
            up(&good).await == Some(1.0)
        })
        .await,
        "the trusted server never read Prometheus: {:?} / {:?}",
        good.get_json::<Value>("/system/scale-events?limit=5").await,
        up(&good).await
    );
    assert!(
        poll(Duration::from_secs(30), || async {
            up(&bad).await == Some(0.0)
        })
        .await,
        "an untrusted certificate must be an outage"
    );
    let metrics = bad.metrics().await;
    assert!(
        sample(
            &metrics,
            r#"faastastic_policy_source_errors_total{policy="tls"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    let last = sample(
        &metrics,
        r#"faastastic_autoscaler_last_evaluation_timestamp_seconds{loop="query:tls"}"#,
    )
    .expect("the query loop reports its passes");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last).abs() < 10.0, "last pass {last}, now {now}");
    assert!(sample(
        &metrics,
        r#"faastastic_autoscaler_last_evaluation_timestamp_seconds{loop="ticker"}"#
    )
    .is_some());
    let events: Vec<Value> = bad.get_json("/system/scale-events?limit=5").await;
    let outage = events
        .iter()
        .find(|e| e["outcome"] == "source_unavailable")
        .expect("one outage event");
    let reason = outage["reason"].as_str().unwrap().to_lowercase();
    assert!(
        reason.contains("certificate") || reason.contains("tls"),
        "{reason}"
    );
    // Good credentials matter: a wrong password is an outage too.
    std::fs::write(dir.path().join("password"), "wrong\n").unwrap();
    let wrong = Server::with(Options {
        config: Some(&trusted),
        ..Default::default()
    });
    assert!(
        poll(Duration::from_secs(30), || async {
            up(&wrong).await == Some(0.0)
        })
        .await,
        "a wrong password must be an outage"
    );
}

/// In shadow mode a periodic query recommends the same step at every evaluation (nothing
/// changes); it is recorded once, not once per interval.
#[tokio::test]
async fn a_shadow_query_decision_is_recorded_once_until_it_changes() {
    let s = Server::with(Options {
        config: Some(
            r#"
[[autoscale.queries]]
name = "pinned"
strategy = "fixed"
replicas = 3
interval_ms = 100
"#,
        ),
        ..Default::default()
    });
    let mut f = echo_function("shadowed");
    f["labels"] = json!({"com.faastastic.scale.shadow": "true", "com.openfaas.scale.max": "5"});
    assert_eq!(s.deploy(f).await.status(), 202);
    let dry_runs = || async {
        let events: Value = s
            .get_json("/system/scale-events?function=shadowed&limit=100")
            .await;
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["outcome"] == "dry_run")
            .count()
    };
    assert!(
        poll(Duration::from_secs(10), || async { dry_runs().await >= 1 }).await,
        "the shadow decision is recorded"
    );
    // Ten more evaluations of the policy record nothing more.
    let evaluations = || async {
        sample(
            &s.metrics().await,
            r#"faastastic_autoscaler_evaluation_duration_seconds_count{loop="query:pinned"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = evaluations().await;
    assert!(
        poll(Duration::from_secs(20), || async {
            evaluations().await >= before + 10.0
        })
        .await,
        "the policy keeps evaluating"
    );
    assert_eq!(dry_runs().await, 1, "recorded once");
    assert_eq!(replicas(&s, "shadowed").await, 1, "nothing changed");
}
