//! Three datacenters from one control plane: `stage` on the local platform, `lon` and `syd`
//! as `faastastic agent` processes on loopback. Placement, per-datacenter status, invocations
//! pinned to a datacenter, alerts that scale one datacenter, and a datacenter that dies and
//! comes back (partial failures named, then the reconciler converges it).

mod common;

use std::time::Duration;

use common::{echo_function, free_port, poll, Agent, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

fn config(lon: u16, syd: u16, dir: &std::path::Path) -> String {
    remote_config(&[("lon", lon), ("syd", syd)], 3000, dir)
}

/// `stage` on the local platform, then one remote datacenter per (name, agent port), each
/// with the agents' token and a platform timeout of `timeout_ms`.
fn remote_config(remotes: &[(&str, u16)], timeout_ms: u64, dir: &std::path::Path) -> String {
    let token = dir.join("token");
    let mut cfg = "reconcile_interval_ms = 300\n[[datacenters]]\nname = \"stage\"\n".to_string();
    for (name, port) in remotes {
        cfg.push_str(&format!(
            "[[datacenters]]\nname = \"{name}\"\nplatform = \"remote\"\nurl = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\ntimeout_ms = {timeout_ms}\n",
            token.display()
        ));
    }
    cfg
}

/// `datacenters.DC.availableReplicas` of a function, 0 when absent.
async fn ready_in(s: &Server, name: &str, dc: &str) -> u64 {
    s.status(name).await.1["datacenters"][dc]["availableReplicas"]
        .as_u64()
        .unwrap_or(0)
}

async fn invoke_in(s: &Server, name: &str, dc: &str) -> (u16, String) {
    let r = s
        .http
        .post(s.url(&format!("/function/{name}")))
        .header("X-Faastastic-Datacenter", dc)
        .body(format!("hello {dc}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn scale(s: &Server, body: Value) -> (u16, String) {
    let name = body["serviceName"].as_str().unwrap().to_string();
    let r = s
        .system(Method::POST, &format!("/system/scale-function/{name}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn three_datacenters_one_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let (lon_port, syd_port) = (free_port(), free_port());
    let _lon = Agent::start("lon", lon_port, dir.path());
    let mut syd = Agent::start("syd", syd_port, dir.path());
    let cfg = config(lon_port, syd_port, dir.path());
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });

    // Deployed everywhere by default; each datacenter reports its own counts.
    assert_eq!(s.deploy(echo_function("hello")).await.status(), 202);
    for dc in ["stage", "lon", "syd"] {
        assert!(
            poll(Duration::from_secs(30), || async {
                ready_in(&s, "hello", dc).await == 1
            })
            .await,
            "hello never became ready in {dc}: {}",
            s.status("hello").await.1
        );
    }
    let status = s.status("hello").await.1;
    assert_eq!(
        (
            status["replicas"].as_u64(),
            status["availableReplicas"].as_u64()
        ),
        (Some(3), Some(3)),
        "the OpenFaaS fields are totals: {status}"
    );

    // Each datacenter serves its own invocations, through its agent for lon and syd.
    for dc in ["stage", "lon", "syd"] {
        assert_eq!(
            invoke_in(&s, "hello", dc).await,
            (200, format!("hello {dc}"))
        );
    }
    let (code, body) = invoke_in(&s, "hello", "mars").await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("stage, lon, syd"), "{body}");
    assert!(body.contains("\"mars\""), "the value is repeated: {body}");

    // An alert labelled datacenter=lon scales only lon.
    let alert = common::alert_payload(
        "firing",
        "f1",
        json!({"alertname": "Busy", "function_name": "hello", "datacenter": "lon",
               "scale_action": "to", "replicas": "3"}),
    );
    let r = s.post_alert(&alert).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["alerts"][0]["outcome"], "scaled", "{answer}");
    assert_eq!(answer["alerts"][0]["datacenter"], "lon", "{answer}");
    assert!(
        poll(Duration::from_secs(30), || async {
            ready_in(&s, "hello", "lon").await == 3
        })
        .await
    );
    let status = s.status("hello").await.1;
    for (dc, want) in [("stage", 1), ("lon", 3), ("syd", 1)] {
        assert_eq!(
            status["datacenters"][dc]["replicas"].as_u64(),
            Some(want),
            "{status}"
        );
    }
    let events: Vec<Value> = s
        .get_json("/system/scale-events?function=hello&datacenter=lon")
        .await;
    assert_eq!(events[0]["datacenter"], "lon");

    // Filters: ?datacenter= counts one datacenter only.
    let lon_only: Value = s.get_json("/system/function/hello?datacenter=lon").await;
    assert_eq!(lon_only["replicas"], 3);
    assert_eq!(lon_only["datacenters"].as_object().unwrap().len(), 1);

    // syd dies: operations report it by name, and what succeeded elsewhere stays.
    syd.kill();
    let (code, body) = scale(&s, json!({"serviceName": "hello", "replicas": 6})).await;
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("syd"), "{body}");
    let status = s.status("hello").await.1;
    for (dc, want) in [("stage", 2), ("lon", 2), ("syd", 2)] {
        assert_eq!(
            status["datacenters"][dc]["replicas"].as_u64(),
            Some(want),
            "desired state keeps syd's share: {status}"
        );
    }
    let r = s.deploy(echo_function("later")).await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("syd"));
    for dc in ["stage", "lon"] {
        assert_eq!(invoke_in(&s, "later", dc).await.0, 200, "later in {dc}");
    }
    // The reconciler's healthcheck says which datacenter is down.
    let up = |dc: &'static str| {
        let s = &s;
        async move {
            common::sample(
                &s.metrics().await,
                &format!("faastastic_datacenter_up{{datacenter=\"{dc}\"}}"),
            )
        }
    };
    assert!(
        poll(Duration::from_secs(10), || async {
            up("syd").await == Some(0.0)
        })
        .await,
        "syd never reported down: {:?}",
        up("syd").await
    );
    assert_eq!(up("lon").await, Some(1.0));
    assert_eq!(up("stage").await, Some(1.0));

    // syd comes back empty: the reconciler deploys both functions there at their counts.
    let _syd = Agent::start("syd", syd_port, dir.path());
    let converged = poll(Duration::from_secs(60), || async {
        ready_in(&s, "hello", "syd").await == 2 && ready_in(&s, "later", "syd").await == 1
    })
    .await;
    assert!(
        converged,
        "syd never converged: {} / {}",
        s.status("hello").await.1,
        s.status("later").await.1
    );
    assert_eq!(
        invoke_in(&s, "later", "syd").await,
        (200, "hello syd".into())
    );

    // Removing from one datacenter leaves the others.
    let r = s
        .system(Method::DELETE, "/system/functions")
        .json(&json!({"functionName": "later", "datacenter": "lon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status = s.status("later").await.1;
    let dcs: Vec<&String> = status["datacenters"].as_object().unwrap().keys().collect();
    assert_eq!(dcs, ["stage", "syd"]);
    // Pinned to a datacenter it is not in: a 404 naming it, as scale-function answers.
    let (code, body) = invoke_in(&s, "later", "lon").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("not in datacenter lon"), "{body}");
}

#[tokio::test]
async fn placement_by_constraints_and_labels() {
    let cfg = "datacenters = [\"stage\", \"lon\", \"syd\"]\n";
    let s = Server::with(Options {
        config: Some(cfg),
        ..Default::default()
    });
    let placed = |v: &Value| -> Vec<String> {
        v["datacenters"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };

    let mut f = echo_function("only-lon");
    f["constraints"] = json!(["datacenter==lon", "node.platform.os == linux"]);
    assert_eq!(s.deploy(f).await.status(), 202);
    assert_eq!(placed(&s.status("only-lon").await.1), ["lon"]);

    let mut f = echo_function("not-syd");
    f["constraints"] = json!(["datacenter != syd"]);
    assert_eq!(s.deploy(f).await.status(), 202);
    assert_eq!(placed(&s.status("not-syd").await.1), ["lon", "stage"]);

    let mut f = echo_function("labelled");
    f["labels"] = json!({"com.faastastic.datacenters": "syd,stage"});
    assert_eq!(s.deploy(f).await.status(), 202);
    assert_eq!(placed(&s.status("labelled").await.1), ["stage", "syd"]);

    // One call per datacenter, as Terraform with one provider block each: the same spec
    // for another datacenter adds it; a different spec is a conflict.
    let mut f = echo_function("per-dc");
    f["constraints"] = json!(["datacenter==stage"]);
    assert_eq!(s.deploy(f.clone()).await.status(), 202);
    f["constraints"] = json!(["datacenter==syd"]);
    assert_eq!(s.deploy(f.clone()).await.status(), 202);
    let status = s.status("per-dc").await.1;
    assert_eq!(placed(&status), ["stage", "syd"]);
    assert_eq!(
        status["constraints"],
        json!(["datacenter==stage", "datacenter==syd"]),
        "the listed constraints say where it runs: {status}"
    );
    assert_eq!(s.deploy(f.clone()).await.status(), 409, "already in syd");
    f["constraints"] = json!(["datacenter==lon"]);
    f["envVars"] = json!({"other": "spec"});
    let r = s.deploy(f).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("different spec"));

    // Unknown datacenters and empty placements are named; nothing is stored.
    let mut f = echo_function("nowhere");
    f["constraints"] = json!(["datacenter==mars"]);
    let r = s.deploy(f).await;
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("\"mars\" is not one of stage, lon, syd"));
    let mut f = echo_function("nowhere");
    f["constraints"] = json!(["datacenter==lon", "datacenter!=lon"]);
    assert_eq!(s.deploy(f).await.status(), 400);
    assert_eq!(s.status("nowhere").await.0, 404);

    // The list filters by datacenter; a manual scale without one spreads the total, home
    // (stage, the first) first; with one, it scales that datacenter only.
    let in_lon: Vec<Value> = s.get_json("/system/functions?datacenter=lon").await;
    let names: Vec<&str> = in_lon.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["not-syd", "only-lon"]);
    let (code, _) = scale(&s, json!({"serviceName": "not-syd", "replicas": 3})).await;
    assert_eq!(code, 202);
    let st = s.status("not-syd").await.1;
    assert_eq!(
        (
            st["datacenters"]["stage"]["replicas"].as_u64(),
            st["datacenters"]["lon"]["replicas"].as_u64()
        ),
        (Some(2), Some(1)),
        "{st}"
    );
    let (code, _) = scale(
        &s,
        json!({"serviceName": "not-syd", "replicas": 0, "datacenter": "stage"}),
    )
    .await;
    assert_eq!(code, 202);
    let st = s.status("not-syd").await.1;
    assert_eq!(st["replicas"], 1, "{st}");
    let (code, body) = scale(
        &s,
        json!({"serviceName": "not-syd", "replicas": 1, "datacenter": "syd"}),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = scale(
        &s,
        json!({"serviceName": "not-syd", "replicas": 1, "datacenter": "mars"}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
}

/// The server is killed with SIGKILL while a decision's platform call hangs (lon's agent is
/// stopped with SIGSTOP). After a restart the decision is there once, the reconciler applies
/// it, and Alertmanager's retry of the unanswered webhook does not apply it again.
#[tokio::test]
async fn a_server_killed_mid_scale_neither_loses_nor_repeats_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let lon_port = free_port();
    let lon = Agent::start("lon", lon_port, dir.path());
    // A platform timeout longer than the test waits: the call is still in flight at the kill.
    let cfg = remote_config(&[("lon", lon_port)], 60000, dir.path());
    let data = dir.path().join("data");
    let options = || Options {
        config: Some(&cfg),
        data_dir: Some(&data),
        ..Default::default()
    };
    let mut s = Server::with(options());
    assert_eq!(s.deploy(echo_function("busy")).await.status(), 202);
    assert!(
        poll(Duration::from_secs(30), || async {
            ready_in(&s, "busy", "lon").await == 1
        })
        .await
    );
    let alert = common::alert_payload(
        "firing",
        "k1",
        json!({"alertname": "Busy", "function_name": "busy", "datacenter": "lon"}),
    );
    let scaled_in_lon = |events: &Vec<Value>| {
        events
            .iter()
            .filter(|e| e["datacenter"] == "lon" && e["outcome"] == "scaled")
            .count()
    };

    let stop = |sig| unsafe { libc::kill(lon.0.id() as i32, sig) };
    assert_eq!(stop(libc::SIGSTOP), 0);
    let hung = tokio::spawn(s.system(Method::POST, "/system/alert").json(&alert).send());
    let recorded = poll(Duration::from_secs(20), || async {
        let events: Vec<Value> = s.get_json("/system/scale-events?function=busy").await;
        scaled_in_lon(&events) == 1
    })
    .await;
    assert!(
        recorded,
        "the decision was not stored before the platform call"
    );
    assert!(!hung.is_finished(), "the platform call was meant to hang");
    s.kill();
    assert_eq!(stop(libc::SIGCONT), 0);
    let _ = hung.await;

    let s = Server::with(options());
    let converged = poll(Duration::from_secs(30), || async {
        ready_in(&s, "busy", "lon").await == 2
    })
    .await;
    assert!(
        converged,
        "lon never reached 2: {}",
        s.status("busy").await.1
    );
    // Alertmanager never got an answer, so it sends the same alert again.
    let r = s.post_alert(&alert).await;
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_ne!(answer["alerts"][0]["outcome"], "scaled", "{answer}");
    let events: Vec<Value> = s.get_json("/system/scale-events?function=busy").await;
    assert_eq!(scaled_in_lon(&events), 1, "{events:#?}");
    let status = s.status("busy").await.1;
    assert_eq!(status["datacenters"]["lon"]["replicas"], 2, "{status}");
    assert_eq!(status["datacenters"]["stage"]["replicas"], 1, "{status}");
}

/// With `placement = "home"`, a function deployed with no constraint runs at home; the same
/// spec with a datacenter constraint adds that datacenter.
#[tokio::test]
async fn a_datacenter_is_added_to_a_function_deployed_without_constraints() {
    let s = Server::with(Options {
        config: Some("datacenters = [\"stage\", \"lon\", \"syd\"]\nplacement = \"home\"\n"),
        ..Default::default()
    });
    let f = echo_function("homebody");
    assert_eq!(s.deploy(f.clone()).await.status(), 202);
    let mut more = f.clone();
    more["constraints"] = json!(["datacenter==syd"]);
    let r = s.deploy(more).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let status = s.status("homebody").await.1;
    let dcs: Vec<&String> = status["datacenters"].as_object().unwrap().keys().collect();
    assert_eq!(dcs, ["stage", "syd"], "{status}");
    // A different spec is still a conflict, and its message points at PUT.
    let mut other = f.clone();
    other["constraints"] = json!(["datacenter==lon"]);
    other["envVars"] = json!({"changed": "yes"});
    let r = s.deploy(other).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("PUT /system/functions"));
}

/// A function on an agent whose replica keeps exiting: the control plane's status says why
/// in that datacenter's entry, as it does for its own platforms; a broken update there says it
/// is not serving, and why, while the old version serves on.
#[tokio::test]
async fn an_agents_crashes_and_stalled_updates_show_in_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let lon_port = free_port();
    let _lon = Agent::start("lon", lon_port, dir.path());
    let cfg = remote_config(&[("lon", lon_port)], 3000, dir.path());
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    let crashing = json!({"service": "crashy", "image": "x",
        "constraints": ["datacenter==lon"],
        "envProcess": "sh -c 'echo cannot start >&2; exit 3'",
        "envVars": {"mode": "http", "upstream_url": format!("http://127.0.0.1:{}", free_port())}});
    assert_eq!(s.deploy(crashing).await.status(), 202);
    let explained = poll(Duration::from_secs(20), || async {
        let st = s.status("crashy").await.1;
        st["datacenters"]["lon"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarting"))
    })
    .await;
    assert!(explained, "{}", s.status("crashy").await.1);

    let mut good = echo_function("rolled");
    good["constraints"] = json!(["datacenter==lon"]);
    assert_eq!(s.deploy(good).await.status(), 202);
    assert!(
        poll(Duration::from_secs(30), || async {
            ready_in(&s, "rolled", "lon").await == 1
        })
        .await
    );
    let broken = json!({"service": "rolled", "image": "x",
        "constraints": ["datacenter==lon"],
        "envProcess": "sh -c 'exit 4'",
        "envVars": {"mode": "http", "upstream_url": format!("http://127.0.0.1:{}", free_port())}});
    let put = s
        .system(Method::PUT, "/system/functions")
        .json(&broken)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);
    let stalled = poll(Duration::from_secs(20), || async {
        let st = s.status("rolled").await.1;
        let update = &st["datacenters"]["lon"]["update"];
        update["ready"] == false
            && update["reason"]
                .as_str()
                .is_some_and(|r| r.contains("restarting"))
    })
    .await;
    assert!(stalled, "{}", s.status("rolled").await.1);
    assert_eq!(invoke_in(&s, "rolled", "lon").await.0, 200);
}
