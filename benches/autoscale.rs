//! Autoscaler benchmarks: the engine's decisions per second on one core, the webhook's
//! latency for a 100-alert Alertmanager payload through the real router (in process, store
//! included, platform calls excluded by dry-run functions at zero replicas), and one query
//! policy evaluation over 10,000 functions in 3 datacenters from one result (platform calls
//! excluded by a platform that only records counts).
//!
//! Run: `cargo bench --bench autoscale` (prints Markdown rows for BENCHMARKS.md).
//!
//! The allocator is the server's own (mimalloc), so allocations cost here what they cost in
//! `faastastic serve`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::{Duration, Instant};

use axum::body::Body;
use chrono::{TimeZone, Utc};
use faastastic::autoscale::clock::SystemClock;
use faastastic::autoscale::executor::Autoscaler;
use faastastic::autoscale::policy::{decide, Action, Input, Policy, State, Step};
use faastastic::autoscale::query::{apply_values, Enough, Values};
use faastastic::autoscale::strategy::Strategy;
use faastastic::config::{Config, Placement, QueryPolicy, QuerySource};
use faastastic::fleet::{Datacenter, Fleet};
use faastastic::model::{FunctionDeployment, FunctionId};
use faastastic::platform::fake::FakePlatform;
use faastastic::proxy::Activity;
use faastastic::store::Store;
use faastastic::telemetry::Metrics;
use http::Request;
use http_body_util::BodyExt;
use serde_json::json;
use std::sync::Arc;
use tower::ServiceExt;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn engine() {
    let policy = Policy {
        min: 1,
        max: 20,
        step_up: Step::PercentOfMax(10),
        step_down: Step::Count(1),
        up_cooldown: Duration::from_secs(5),
        down_cooldown: Duration::from_secs(30),
        stabilization_window: Duration::from_secs(60),
        resolved_to_min: false,
        scale_to_zero_after: None,
        ..Policy::default()
    };
    let t0 = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    // A realistic state: a few recommendations in the window and an applied alert.
    let (_, mut state) = decide(
        &policy,
        1,
        &State::default(),
        Input::Signal {
            action: Action::StepUp,
            dedupe_key: Some("fp@t@firing"),
            observed_rate: None,
        },
        t0,
    );
    for i in 1..4 {
        let (_, s) = decide(
            &policy,
            3,
            &state,
            Input::Signal {
                action: Action::StepUp,
                dedupe_key: None,
                observed_rate: None,
            },
            t0 + chrono::Duration::seconds(i * 6),
        );
        state = s;
    }
    let now = t0 + chrono::Duration::seconds(30);
    let n: u32 = if smoke() { 20_000 } else { 2_000_000 };
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for i in 0..n {
            let action = if i % 2 == 0 {
                Action::StepUp
            } else {
                Action::Resolved
            };
            let (d, s) = decide(
                black_box(&policy),
                black_box(5),
                black_box(&state),
                Input::Signal {
                    action,
                    dedupe_key: Some("other@t@firing"),
                    observed_rate: None,
                },
                now,
            );
            // The text is rendered as the executor renders it for every recorded decision.
            black_box((d.reason.to_string(), s));
        }
        best = best.min(start.elapsed());
    }
    let per_sec = n as f64 / best.as_secs_f64();
    report(format!(
        "| engine: decide() on one core | {:.0} decisions/s ({:.0} ns each) | ≥ 1,000,000/s | {} |",
        per_sec,
        best.as_nanos() as f64 / n as f64,
        if per_sec >= 1_000_000.0 {
            "pass"
        } else {
            "FAIL"
        }
    ));
}

async fn webhook() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        data_dir: dir.path().join("data"),
        ..Default::default()
    };
    cfg.auth.enabled = false;
    cfg.autoscale.webhook_rate_per_sec = 1_000_000;
    let app = faastastic::server::build(&cfg).await.unwrap();
    let router =
        faastastic::api::router(app.state.clone(), faastastic::api::auth::Auth::disabled());
    let functions = 100;
    for i in 0..functions {
        let body = json!({"service": format!("fn{i}"), "image": "x", "envProcess": "cat",
            "labels": {"com.faastastic.scale.dry-run": "true", "com.openfaas.scale.min": "1"}});
        let r = router
            .clone()
            .oneshot(
                Request::post("/system/functions")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let r = router
            .clone()
            .oneshot(
                Request::post(format!("/system/scale-function/fn{i}"))
                    .body(Body::from(r#"{"replicas":0}"#))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let payload = |round: usize| {
        let alerts: Vec<_> = (0..functions)
            .map(|i| json!({"status": "firing", "labels": {"alertname": "APIHighInvocationRate", "function_name": format!("fn{i}.openfaas-fn")},
                "annotations": {}, "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "", "fingerprint": format!("{round}-{i}")}))
            .collect();
        json!({"version": "4", "groupKey": "{}", "status": "firing", "receiver": "scale-up", "alerts": alerts}).to_string()
    };
    let rounds = if smoke() { 5 } else { 200 };
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds + 10 {
        let body = payload(round);
        let start = Instant::now();
        let r = router
            .clone()
            .oneshot(
                Request::post("/system/alert")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let answer = r.into_body().collect().await.unwrap().to_bytes();
        let elapsed = start.elapsed();
        assert!(answer.windows(9).any(|w| w == b"\"dry_run\""));
        if round >= 10 {
            times.push(elapsed);
        }
    }
    times.sort();
    let p50 = percentile(&times, 0.5);
    let p99 = percentile(&times, 0.99);
    let per_alert_p99 = p99 / functions as u32;
    let total: Duration = times.iter().sum();
    report(format!(
        "| webhook: 100-alert payload, end to end in process (engine + store, no platform calls) | p50 {:.2} ms, p99 {:.2} ms per payload; p99 {:.1} µs per alert; {:.0} alerts/s | p99 < 1 ms per alert | {} |",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        per_alert_p99.as_secs_f64() * 1e6,
        (rounds * functions) as f64 / total.as_secs_f64(),
        if per_alert_p99 < Duration::from_millis(1) { "pass" } else { "FAIL" }
    ));
    app.state.fleet.shutdown().await;
}

/// A platform that runs nothing and never readies a replica, so the benchmark measures the
/// control plane.
fn counting() -> Arc<FakePlatform> {
    let p = FakePlatform::new();
    p.never_ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    p
}

async fn evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).unwrap();
    let datacenters = ["stage", "lon", "syd"]
        .iter()
        .map(|dc| {
            Arc::new(Datacenter::new(
                dc,
                counting(),
                Duration::from_secs(5),
                1_000_000,
            ))
        })
        .collect();
    // The fleet and the engine read the same settings, as in the server.
    let mut cfg = Config::default().autoscale;
    cfg.scale_rate_per_sec = 1_000_000;
    let fleet = Arc::new(
        Fleet::restore(
            store.clone(),
            datacenters,
            "stage",
            Placement::All,
            "openfaas-fn",
            64,
            Arc::new(cfg.clone()),
        )
        .await
        .unwrap(),
    );
    let functions = 10_000;
    for i in 0..functions {
        fleet
            .deploy(FunctionDeployment {
                service: Some(format!("fn{i}")),
                image: Some("x".into()),
                labels: Some([("com.openfaas.scale.max".to_string(), "10".to_string())].into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let autoscaler = Autoscaler::restore(
        fleet.clone(),
        store,
        Arc::new(Metrics::new()),
        Arc::new(Activity::default()),
        None,
        cfg,
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let policy = QueryPolicy {
        name: "rps".into(),
        source: QuerySource::Prometheus {
            query:
                "sum by (function_name, datacenter) (rate(gateway_function_invocation_total[10s]))"
                    .into(),
        },
        pattern: glob::Pattern::new("*").unwrap(),
        strategy: Strategy::Target {
            target: 5.0,
            per_replica: false,
            tolerance: 0.1,
        },
        interval: Duration::from_secs(2),
        fallback_replicas: None,
        function_label: "function_name".into(),
        datacenter_label: "datacenter".into(),
        short_window: None,
    };
    // Every function in every datacenter at its target (hold), and 1 % of them (in syd)
    // changing load each cycle: 40/s (scale up) or back (held by the down cooldown).
    let values = |round: usize| {
        let mut v = Values::new();
        for i in 0..functions {
            let id = FunctionId::new(format!("fn{i}"), "openfaas-fn");
            let entry = v.entry(id).or_default();
            for dc in ["stage", "lon", "syd"] {
                let busy = dc == "syd" && i % 100 == 0 && round % 2 == 1;
                entry.set(Some(dc.to_string()), if busy { 40.0 } else { 4.8 });
            }
        }
        v
    };
    let rounds = if smoke() { 2 } else { 20 };
    let mut enough = Enough::default();
    let mut times = Vec::new();
    for round in 0..rounds + 2 {
        let v = values(round);
        let start = Instant::now();
        apply_values(&policy, Some(&v), None, &mut enough, &fleet, &autoscaler).await;
        times.push(start.elapsed());
    }
    report_times(
        "query policy: one evaluation of one result over 10,000 functions × 3 datacenters (30,000 values, 1 % of them scaling each cycle; store included, platform excluded)",
        times,
        Duration::from_millis(50),
    );
    // The short window's turn between two reads of the source (every 500 ms), from its rates
    // for the functions that had invocations (here the 1 % under load): only those are
    // visited.
    let short_policy = QueryPolicy {
        short_window: Some(faastastic::config::SHORT_WINDOW),
        ..policy.clone()
    };
    let short = |round: usize| {
        let mut v = Values::new();
        for i in (0..functions).step_by(100) {
            let id = FunctionId::new(format!("fn{i}"), "openfaas-fn");
            let busy = round % 2 == 1;
            v.entry(id)
                .or_default()
                .set(Some("syd".into()), if busy { 40.0 } else { 4.8 });
        }
        v
    };
    let mut times = Vec::new();
    for round in 0..rounds + 2 {
        let v = short(round);
        let start = Instant::now();
        let (fleet, autoscaler) = (&fleet, &autoscaler);
        apply_values(
            &short_policy,
            None,
            Some(&v),
            &mut enough,
            fleet,
            autoscaler,
        )
        .await;
        times.push(start.elapsed());
    }
    report_times(
        "query policy: one short-window turn between reads over the same fleet, its rates given (the 100 functions with invocations, 8× their target every other turn)",
        times,
        Duration::from_millis(10),
    );
}

/// Reports p50 and max of `times` after the first two (warm-up) against a p50 target.
fn report_times(what: &str, mut times: Vec<Duration>, target: Duration) {
    let mut times = times.split_off(2.min(times.len()));
    times.sort();
    let p50 = percentile(&times, 0.5);
    let max = *times.last().unwrap();
    report(format!(
        "| {what} | p50 {:.1} ms, max {:.1} ms | < {} ms | {} |",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        target.as_millis(),
        if p50 < target { "pass" } else { "FAIL" }
    ));
}

/// `--smoke`: a few iterations of each, to check that the benchmark still runs.
fn smoke() -> bool {
    std::env::args().any(|a| a == "--smoke")
}

static ROWS: std::sync::Mutex<Vec<serde_json::Value>> = std::sync::Mutex::new(Vec::new());

/// Prints one Markdown row (`| what | faastastic | target | pass |`) and keeps it for the JSON
/// summary that `scripts/bench_report.py` collects.
fn report(line: String) {
    println!("{line}");
    let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
    if let [what, figure, target, pass] = cells[..] {
        ROWS.lock().unwrap().push(json!({
            "part": "autoscale", "what": what, "faastastic": figure, "baseline": null,
            "ratio": null, "target": target, "pass": pass == "pass"
        }));
    }
}

fn main() {
    // `cargo test --all-targets` runs benches once as tests; keep that quick.
    if std::env::args().any(|a| a == "--bench") {
        println!("| what | faastastic | target | pass |\n|---|---|---|---|");
        engine();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(webhook());
        runtime.block_on(evaluation());
        let path = std::env::var("FAASTASTIC_BENCH_JSON")
            .unwrap_or_else(|_| "target/bench-autoscale.json".into());
        let table = json!({"table": *ROWS.lock().unwrap(), "smoke": smoke()});
        std::fs::write(&path, serde_json::to_string_pretty(&table).unwrap())
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
}
