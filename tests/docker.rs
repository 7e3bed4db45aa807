//! The `docker` platform against a real dockerd (Debian `docker.io`; `scripts/test.sh` starts
//! it). Images cannot be pulled here, so the test builds one: `docker import` of a root
//! filesystem holding busybox-static and faastastic itself (its watchdog) with the libraries
//! `ldd` lists.

mod common;

use std::process::Command;
use std::time::Duration;

use common::docker::{build_image, require_docker, Image, Sweep};
use common::{poll, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

/// Container ids with these labels (running or not).
fn containers(labels: &[String]) -> Vec<String> {
    let mut cmd = Command::new("docker");
    cmd.args(["ps", "-aq"]);
    for l in labels {
        cmd.args(["--filter", &format!("label={l}")]);
    }
    String::from_utf8(cmd.output().unwrap().stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn docker_deploy_invoke_scale_logs_redeploy_remove() {
    require_docker();
    let dc = format!("dock{}", std::process::id());
    let image = Image(format!("faastastic-test/echo:{dc}"));
    let _sweep = Sweep(dc.clone());
    build_image(&image.0);
    // pull = false: nothing may leave this machine.
    let cfg = format!("[[datacenters]]\nname = \"{dc}\"\nplatform = \"docker\"\npull = false\n");
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    let labels = |extra: &[&str]| -> Vec<String> {
        let mut l = vec![
            format!("com.faastastic.datacenter={dc}"),
            "com.faastastic.function=echo".to_string(),
        ];
        l.extend(extra.iter().map(|e| e.to_string()));
        l
    };

    let f = json!({"service": "echo", "image": image.0,
        "envProcess": "sh -c 'echo called >&2; cat'",
        "labels": {"team": "core"}, "limits": {"memory": "64Mi"}});
    let r = s.deploy(f.clone()).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    s.wait_available("echo", 1).await;
    assert_eq!(s.invoke("echo", "hello").await, (200, "hello".into()));
    let ids = containers(&labels(&["team=core"]));
    assert_eq!(ids.len(), 1, "one labelled container per replica");
    let inspect = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.HostConfig.NetworkMode}} {{.HostConfig.Memory}} {{range $p, $b := .NetworkSettings.Ports}}{{$p}}={{range $b}}{{.HostIp}} {{end}}{{end}}",
        ])
        .arg(&ids[0])
        .output()
        .unwrap();
    // Its own network namespace, 8080 inside published on loopback only.
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        format!("bridge {} 8080/tcp=127.0.0.1", 64 << 20)
    );

    // 1 -> 4 -> 1, each count visible in the engine.
    for want in [4u64, 1] {
        assert_eq!(s.scale("echo", want).await, 202);
        assert!(
            poll(Duration::from_secs(60), || async {
                s.available("echo").await == want && containers(&labels(&[])).len() as u64 == want
            })
            .await,
            "never reached {want}: {} / {:?}",
            s.status("echo").await.1,
            containers(&labels(&[]))
        );
    }
    for i in 0..8 {
        assert_eq!(s.invoke("echo", &format!("x{i}")).await.0, 200);
    }

    // Logs come from the engine.
    let logs = s.system_text("/system/logs?name=echo&follow=false").await;
    assert!(logs.contains("called"), "{logs}");

    // A redeploy under the same name never reaches the old container.
    let old = containers(&labels(&[]));
    let mut v2 = f.clone();
    v2["envProcess"] = json!("sh -c 'cat >/dev/null; echo v2'");
    assert_eq!(s.update(&v2).await, 202);
    assert!(
        poll(Duration::from_secs(60), || async {
            let left = containers(&labels(&[]));
            !left.iter().any(|c| old.contains(c)) && s.available("echo").await == 1
        })
        .await,
        "the old container was not retired"
    );
    for _ in 0..10 {
        assert_eq!(s.invoke("echo", "x").await, (200, "v2\n".into()));
    }

    // Remove leaves nothing behind.
    assert_eq!(s.remove("echo").await, 202);
    assert!(containers(&labels(&[])).is_empty());
    assert_eq!(s.invoke("echo", "x").await.0, 404);

    // An image the engine does not have (and cannot pull) is a clear error, nothing stored.
    let mut missing = f.clone();
    missing["service"] = json!("ghost");
    missing["image"] = json!("faastastic-test/not-there:1");
    let r = s.deploy(missing).await;
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("not-there") && text.contains("pull = false"),
        "{text}"
    );
    assert_eq!(s.status("ghost").await.0, 404);
    let _: Value = s.get_json("/system/functions").await;
}

/// The engine's API goes away (the socket faastastic talks to is cut; dockerd and the
/// containers keep running): running replicas keep serving, changes are refused with an
/// error naming the datacenter and change nothing, the webhook asks Alertmanager to retry,
/// and once the engine answers again the same requests succeed.
// Two workers: the engine link keeps forwarding while the test blocks on starting the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_engine_refuses_changes_and_recovers() {
    require_docker();
    let dc = format!("gone{}", std::process::id());
    let image = Image(format!("faastastic-test/echo:{dc}"));
    let _sweep = Sweep(dc.clone());
    build_image(&image.0);
    let dir = tempfile::tempdir().unwrap();
    let mut link = common::docker::EngineLink::start(&dir.path().join("engine.sock"));
    let cfg = format!(
        "reconcile_interval_ms = 300\n[[datacenters]]\nname = \"{dc}\"\nplatform = \"docker\"\npull = false\nsocket = \"{}\"\n",
        link.path.display()
    );
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    let running = || containers(&[format!("com.faastastic.datacenter={dc}")]);
    let f = json!({"service": "steady", "image": image.0, "envProcess": "cat"});
    assert_eq!(s.deploy(f.clone()).await.status(), 202);
    s.wait_available("steady", 1).await;

    link.down();
    assert_eq!(s.invoke("steady", "up").await, (200, "up".into()));
    let r = s
        .system(Method::POST, "/system/scale-function/steady")
        .json(&json!({"serviceName": "steady", "replicas": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(
        text.contains(&dc) && text.contains("Connect"),
        "the error names the datacenter and the cause: {text}"
    );
    let mut other = f.clone();
    other["service"] = json!("later");
    let r = s.deploy(other.clone()).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    let text = r.text().await.unwrap();
    assert!(
        text.contains("cannot look up image") && !text.contains("is not on this engine"),
        "an engine that does not answer is not a missing image: {text}"
    );
    let alert = common::alert_payload(
        "firing",
        "e1",
        json!({"alertname": "Busy", "function_name": "steady"}),
    );
    let r = s.post_alert(&alert).await;
    assert!(r.status().is_server_error(), "Alertmanager must retry");
    // Nothing changed meanwhile, and the replica still serves.
    assert_eq!(s.status("steady").await.1["replicas"], 1);
    assert_eq!(s.status("later").await.0, 404);
    assert_eq!(running().len(), 1);
    assert_eq!(s.invoke("steady", "still").await, (200, "still".into()));

    // The engine answers again: Alertmanager's retry and the deploy go through.
    link.up();
    let r = s.post_alert(&alert).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(s.deploy(other).await.status(), 202);
    assert!(
        poll(Duration::from_secs(60), || async {
            s.available("steady").await == 2 && s.available("later").await == 1
        })
        .await,
        "never recovered: {} / {}",
        s.status("steady").await.1,
        s.status("later").await.1
    );
    assert_eq!(running().len(), 3);
    for name in ["steady", "later"] {
        assert_eq!(s.remove(name).await, 202);
    }
    assert!(running().is_empty());
}
