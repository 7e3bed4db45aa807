//! The `swarm` platform against a real single-node swarm on 127.0.0.1 (`scripts/test.sh`
//! initialises it): a service per function, 1 -> 4 -> 1 replicas through service updates,
//! a redeploy that never reaches an old task, and nothing left after remove.

mod common;

use std::process::Command;
use std::time::Duration;

use common::docker::{build_image, require_swarm, Image, Sweep};
use common::{poll, Options, Server};
use serde_json::json;

/// Running tasks of a service.
fn running_tasks(service: &str) -> usize {
    let out = Command::new("docker")
        .args([
            "service",
            "ps",
            "-q",
            "--filter",
            "desired-state=running",
            service,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn services(datacenter: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["service", "ls", "-q", "--filter"])
        .arg(format!("label=com.faastastic.datacenter={datacenter}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn swarm_service_scales_redeploys_and_goes() {
    require_swarm();
    let dc = format!("swarm{}", std::process::id());
    let image = Image(format!("faastastic-test/echo:{dc}"));
    let _sweep = Sweep(dc.clone());
    build_image(&image.0);
    let cfg = format!("[[datacenters]]\nname = \"{dc}\"\nplatform = \"swarm\"\n");
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    let service = format!("faastastic-{dc}-openfaas-fn-echo");

    let f = json!({"service": "echo", "image": image.0, "envProcess": "cat"});
    let r = s.deploy(f.clone()).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    assert!(
        poll(Duration::from_secs(90), || async {
            s.available("echo").await == 1
        })
        .await,
        "never ready: {}",
        s.status("echo").await.1
    );
    assert_eq!(s.invoke("echo", "hello").await, (200, "hello".into()));

    for want in [4u64, 1] {
        assert_eq!(s.scale("echo", want).await, 202);
        assert!(
            poll(Duration::from_secs(90), || async {
                s.available("echo").await == want && running_tasks(&service) == want as usize
            })
            .await,
            "never reached {want}: {} ({} tasks)",
            s.status("echo").await.1,
            running_tasks(&service)
        );
        for i in 0..6 {
            assert_eq!(s.invoke("echo", &format!("x{i}")).await.0, 200);
        }
    }

    // A redeploy under the same name: once the new task answers, only it is reached.
    let mut v2 = f.clone();
    v2["envProcess"] = json!("sh -c 'cat >/dev/null; echo v2'");
    assert_eq!(s.update(&v2).await, 202);
    assert!(
        poll(Duration::from_secs(90), || async {
            s.invoke("echo", "x").await == (200, "v2\n".to_string())
        })
        .await,
        "the new generation never served"
    );
    for _ in 0..10 {
        assert_eq!(s.invoke("echo", "x").await, (200, "v2\n".into()));
    }

    assert_eq!(s.remove("echo").await, 202);
    assert!(services(&dc).is_empty(), "the service is gone");
    assert_eq!(s.invoke("echo", "x").await.0, 404);
}
