//! The cron trigger, in real time against the real binary: OpenFaaS's annotations
//! (`topic: cron-function`, `schedule`) checked at deploy, one run per due time whatever the
//! datacenters (or one in each when asked), a run still going skipping the next, and a server
//! killed and restarted running no due time twice and reporting those it missed. The
//! scheduling rules themselves are unit-tested with a fixed clock (`triggers::cron`).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{poll, Options, Server};
use serde_json::{json, Value};

const TWO_DATACENTERS: &str = r#"
[[datacenters]]
name = "stage"
home = true
[[datacenters]]
name = "lon"
"#;

fn cron_function(name: &str, schedule: &str, command: &str, extra: &[(&str, &str)]) -> Value {
    let mut annotations = json!({"topic": "cron-function", "schedule": schedule});
    for (k, v) in extra {
        annotations[*k] = json!(v);
    }
    json!({"service": name, "image": "local/cron", "envProcess": command, "annotations": annotations})
}

async fn events(s: &Server, name: &str) -> Vec<Value> {
    s.get_json(&format!(
        "/system/trigger-events?function={name}&limit=1000"
    ))
    .await
}

fn with_outcome<'a>(events: &'a [Value], outcome: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["outcome"] == outcome).collect()
}

#[tokio::test]
async fn schedules_are_checked_at_deploy_and_name_the_annotation() {
    let s = Server::start();
    for (annotations, says) in [
        (
            json!({"topic": "cron-function", "schedule": "61 * * * *"}),
            "annotations.schedule: \"61 * * * *\" is not a cron schedule",
        ),
        (
            json!({"topic": "cron-function"}),
            "annotations.schedule: is required with topic=cron-function",
        ),
        (
            json!({"topic": "cron-function", "schedule": "* * * *"}),
            "has 4 fields",
        ),
        (
            json!({"topic": "cron-function", "schedule": "CRON_TZ=Nowhere/Atall 0 9 * * *"}),
            "is not a time zone name",
        ),
        (
            json!({"topic": "cron-function", "schedule": "@every 1s", "com.faastastic.cron.concurrency": "replace"}),
            "annotations.com.faastastic.cron.concurrency",
        ),
    ] {
        let r = s
            .deploy(json!({"service": "nightly", "image": "x", "envProcess": "cat", "annotations": annotations}))
            .await;
        assert_eq!(r.status(), 400, "{annotations}");
        let text = r.text().await.unwrap();
        assert!(text.contains(says), "{text}");
        assert_eq!(s.status("nightly").await.0, 404, "nothing deployed");
    }
    // The UI's JSON errors name the field.
    let r = s
        .system(reqwest::Method::POST, "/system/functions")
        .header("accept", "application/json")
        .json(&cron_function("nightly", "often", "cat", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "annotations.schedule", "{body}");
    // An update with a bad schedule changes nothing.
    assert_eq!(
        s.deploy(cron_function("nightly", "0 3 * * *", "cat", &[]))
            .await
            .status(),
        202
    );
    assert_eq!(
        s.update(&cron_function("nightly", "0 25 * * *", "cat", &[]))
            .await,
        400
    );
    assert_eq!(
        s.status("nightly").await.1["annotations"]["schedule"],
        "0 3 * * *"
    );
}

/// `[triggers.cron] enabled = false`: schedules are still checked and kept at deploy, the
/// function still answers its callers, and nothing runs on the schedule.
#[tokio::test]
async fn with_cron_off_nothing_runs_on_a_schedule() {
    let s = Server::with(Options {
        config: Some("[triggers.cron]\nenabled = false\n"),
        ..Default::default()
    });
    assert_eq!(
        s.deploy(cron_function("bad", "61 * * * *", "cat", &[]))
            .await
            .status(),
        400
    );
    assert_eq!(
        s.deploy(cron_function("tick", "* * * * * *", "cat", &[]))
            .await
            .status(),
        202
    );
    s.wait_available("tick", 1).await;
    let (status, body) = s.invoke("tick", "called").await;
    assert_eq!((status, body.as_str()), (200, "called"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(events(&s, "tick").await.is_empty());
    let f: Value = s.get_json("/system/function/tick").await;
    assert_eq!(f["annotations"]["schedule"], "* * * * * *");
}

/// A run a killed server left going is recorded as interrupted when the server starts again,
/// with cron off too (else it would read `running` for as long as cron stays off).
#[tokio::test]
async fn with_cron_off_a_killed_servers_run_is_still_marked_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = Server::with(Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    assert_eq!(
        s.deploy(cron_function("long", "* * * * * *", "sleep 30", &[]))
            .await
            .status(),
        202
    );
    assert!(
        poll(Duration::from_secs(20), || async {
            !with_outcome(&events(&s, "long").await, "running").is_empty()
        })
        .await,
        "a run going before the kill"
    );
    s.kill();
    let s = Server::with(Options {
        data_dir: Some(&data),
        config: Some("[triggers.cron]\nenabled = false\n"),
        ..Default::default()
    });
    assert!(
        poll(Duration::from_secs(10), || async {
            let e = events(&s, "long").await;
            with_outcome(&e, "running").is_empty() && !with_outcome(&e, "interrupted").is_empty()
        })
        .await,
        "{:?}",
        events(&s, "long").await
    );
}

#[tokio::test]
async fn each_due_time_runs_once_whatever_the_datacenters_or_once_in_each_when_asked() {
    let s = Server::with(Options {
        config: Some(TWO_DATACENTERS),
        ..Default::default()
    });
    // The function logs the headers the OpenFaaS cron connector sends.
    let logs_topic =
        "sh -c 'cat >/dev/null; echo \"topic=$Http_X_Topic connector=$Http_X_Connector\" >&2'";
    assert_eq!(
        s.deploy(cron_function("tick", "* * * * * *", logs_topic, &[]))
            .await
            .status(),
        202
    );
    assert_eq!(
        s.deploy(cron_function(
            "tick-each",
            "* * * * * *",
            "cat",
            &[("com.faastastic.cron.every-datacenter", "true")]
        ))
        .await
        .status(),
        202
    );
    assert!(
        poll(Duration::from_secs(20), || async {
            with_outcome(&events(&s, "tick").await, "ok").len() >= 4
        })
        .await,
        "four runs of a per-second schedule within 20 s: {:?}",
        events(&s, "tick").await
    );
    let tick = events(&s, "tick").await;
    let ok = with_outcome(&tick, "ok");
    let dues: Vec<&str> = ok.iter().map(|e| e["due"].as_str().unwrap()).collect();
    let distinct: HashSet<&&str> = dues.iter().collect();
    assert_eq!(distinct.len(), dues.len(), "a due time ran twice: {dues:?}");
    for e in &ok {
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["datacenter"], "", "routed as an HTTP call is: {e}");
        assert_eq!(e["schedule"], "* * * * * *");
    }
    assert!(with_outcome(&tick, "failed").is_empty(), "{tick:?}");
    // Every run is one invocation (not one per datacenter or replica).
    let metrics = s.metrics().await;
    let invoked: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("gateway_function_invocation_total{")
                && l.contains("function_name=\"tick.openfaas-fn\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let recorded = with_outcome(&events(&s, "tick").await, "ok").len() as f64;
    assert!(
        (invoked - recorded).abs() <= 1.0,
        "{invoked} invocations for {recorded} recorded runs"
    );
    assert!(metrics.contains("faastastic_trigger_runs_total{function_name=\"tick.openfaas-fn\",outcome=\"ok\",trigger=\"cron\"}"), "{metrics}");
    let logs = s.system_text("/system/logs?name=tick&tail=5").await;
    assert!(
        logs.contains("topic=cron-function connector=faastastic-cron"),
        "{logs}"
    );

    let each = events(&s, "tick-each").await;
    let mut per_due: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in with_outcome(&each, "ok") {
        per_due
            .entry(e["due"].as_str().unwrap())
            .or_default()
            .push(e["datacenter"].as_str().unwrap());
    }
    // The newest due time may still be running in one datacenter.
    let complete: Vec<_> = per_due.values().rev().skip(1).collect();
    assert!(complete.len() >= 2, "{each:?}");
    for dcs in complete {
        let mut dcs = dcs.clone();
        dcs.sort();
        assert_eq!(
            dcs,
            ["lon", "stage"],
            "one run in each datacenter per due time"
        );
    }
}

#[tokio::test]
async fn a_run_still_going_skips_the_next_unless_overlaps_are_allowed() {
    let s = Server::start();
    let slow = "sh -c 'cat >/dev/null; sleep 2.5'";
    assert_eq!(
        s.deploy(cron_function("slow", "* * * * * *", slow, &[]))
            .await
            .status(),
        202
    );
    assert_eq!(
        s.deploy(cron_function(
            "slow-overlapping",
            "* * * * * *",
            slow,
            &[("com.faastastic.cron.concurrency", "allow")]
        ))
        .await
        .status(),
        202
    );
    assert!(
        poll(Duration::from_secs(20), || async {
            let e = events(&s, "slow").await;
            with_outcome(&e, "ok").len() >= 2 && with_outcome(&e, "skipped").len() >= 3
        })
        .await,
        "{:?}",
        events(&s, "slow").await
    );
    let slow_events = events(&s, "slow").await;
    // Never two at once: each run starts after the previous one ended.
    let mut runs: Vec<(f64, f64)> = with_outcome(&slow_events, "ok")
        .iter()
        .map(|e| {
            let due = chrono::DateTime::parse_from_rfc3339(e["due"].as_str().unwrap()).unwrap();
            let start = due.timestamp_millis() as f64 / 1000.0;
            (start, start + e["durationSeconds"].as_f64().unwrap())
        })
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in runs.windows(2) {
        assert!(pair[1].0 >= pair[0].1 - 0.2, "overlapping runs: {runs:?}");
    }
    for e in with_outcome(&slow_events, "skipped") {
        assert!(e["reason"].as_str().unwrap().contains("still going"), "{e}");
    }
    let overlapping = events(&s, "slow-overlapping").await;
    assert!(
        with_outcome(&overlapping, "skipped").is_empty(),
        "{overlapping:?}"
    );
    assert!(
        with_outcome(&overlapping, "running").len() + with_outcome(&overlapping, "ok").len() >= 4
    );
}

#[tokio::test]
async fn a_killed_server_runs_no_due_time_twice_and_reports_the_ones_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = Server::with(Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    assert_eq!(
        s.deploy(cron_function("steady", "* * * * * *", "cat", &[]))
            .await
            .status(),
        202
    );
    assert!(
        poll(Duration::from_secs(20), || async {
            with_outcome(&events(&s, "steady").await, "ok").len() >= 2
        })
        .await,
        "two runs before the kill"
    );
    s.kill();
    let killed = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = Server::with(Options {
        data_dir: Some(&data),
        ..Default::default()
    });
    assert!(
        poll(Duration::from_secs(20), || async {
            let e = events(&s, "steady").await;
            !with_outcome(&e, "missed").is_empty()
                && with_outcome(&e, "ok").iter().any(|r| {
                    chrono::DateTime::parse_from_rfc3339(r["due"].as_str().unwrap()).unwrap()
                        > killed
                })
        })
        .await,
        "{:?}",
        events(&s, "steady").await
    );
    let all = events(&s, "steady").await;
    let missed = with_outcome(&all, "missed");
    assert_eq!(missed.len(), 1, "{all:?}");
    assert!(missed[0]["missed"].as_u64().unwrap() >= 2, "{}", missed[0]);
    assert!(missed[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not running"));
    // A due time is run (or was running when the server died) at most once.
    let started: Vec<&str> = all
        .iter()
        .filter(|e| {
            ["ok", "failed", "running", "interrupted"].contains(&e["outcome"].as_str().unwrap())
        })
        .map(|e| e["due"].as_str().unwrap())
        .collect();
    let distinct: HashSet<&&str> = started.iter().collect();
    assert_eq!(
        distinct.len(),
        started.len(),
        "a due time ran twice: {started:?}"
    );
    // Nothing between the last run before the kill and the restart ran late.
    let last_before = with_outcome(&all, "ok")
        .iter()
        .map(|e| e["due"].as_str().unwrap())
        .filter(|d| chrono::DateTime::parse_from_rfc3339(d).unwrap() <= killed)
        .max()
        .unwrap()
        .to_string();
    assert!(missed[0]["firstMissed"].as_str().unwrap() > last_before.as_str());
}
