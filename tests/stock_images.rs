//! Images built the way OpenFaaS templates build them, which know nothing of faastastic
//! (`common::docker::STOCK_ENTRYPOINT`: a server on 8080 whatever it is told, a second fixed
//! port bound inside, `/_/health`), on the docker and swarm platforms against a real dockerd
//! and a real single-node swarm: 1 -> 4 -> 1 with every replica answering, through the invoke
//! lane and the general path, an update under load without a failed request, and a crashing
//! image whose reason shows in the function's status and metrics.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::docker::{build_stock_image, require_docker, require_swarm, Image, Sweep};
use common::{poll, sample, Load, Options, Server};
use serde_json::{json, Value};

/// Which replica answered: each prints its container's host name.
fn hostname_function(image: &str, version: &str) -> Value {
    json!({"service": "stock", "image": image,
        "envProcess": format!("sh -c 'cat >/dev/null; echo {version} $HOSTNAME'")})
}

/// The replicas that answered `calls` invocations (their host names), each of `version`.
async fn answering(s: &Server, calls: usize, version: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..calls {
        let (code, body) = s.invoke("stock", "x").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with(&format!("{version} ")), "{body}");
        seen.insert(body.split_whitespace().nth(1).unwrap_or("").to_string());
    }
    seen
}

async fn stock_image_scales_rolls_and_says_why_it_crashes(platform: &str) {
    let dc = format!("{platform}stock{}", std::process::id());
    let image = Image(format!("faastastic-test/stock:{dc}"));
    let _sweep = Sweep(dc.clone());
    build_stock_image(&image.0);
    let extra = match platform {
        "docker" => "pull = false\n",
        _ => "",
    };
    let cfg = format!("[[datacenters]]\nname = \"{dc}\"\nplatform = \"{platform}\"\n{extra}");
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("serve.log");
    let s = Server::with(Options {
        config: Some(&cfg),
        stderr_log: Some(&log),
        env: &[("RUST_LOG", "warn")],
        ..Default::default()
    });
    let r = s.deploy(hostname_function(&image.0, "v1")).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    s.wait_available("stock", 1).await;
    let restarts = format!(
        "faastastic_replica_restarts_total{{datacenter=\"{dc}\",function_name=\"stock.openfaas-fn\"}}"
    );
    assert_eq!(
        sample(&s.metrics().await, &restarts),
        Some(0.0),
        "the series is there from the deploy on, at zero"
    );

    // 1 -> 4: four replicas of an image that binds 8080 and 8081 inside, each answering.
    assert_eq!(s.scale("stock", 4).await, 202);
    assert!(
        poll(Duration::from_secs(60), || async {
            s.available("stock").await == 4
        })
        .await,
        "never 4 ready: {}",
        s.status("stock").await.1
    );
    let seen = answering(&s, 80, "v1").await;
    assert_eq!(seen.len(), 4, "every replica answers the lane: {seen:?}");
    for _ in 0..4 {
        let (code, text) = s.invoke_chunked("stock", "hi").await;
        assert_eq!(code, 200, "{text}");
        let host = text.lines().last().unwrap_or("").split_whitespace().nth(1);
        assert!(
            host.is_some_and(|h| seen.contains(h)),
            "the general path reaches the same replicas: {text}"
        );
    }

    // An update under load: no request fails while the new version takes over.
    let load = Load::start(&s, "stock", 20, Duration::from_secs(120));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.update(&hostname_function(&image.0, "v2")).await, 202);
    // Done when four replicas of the new version answer: while Swarm rolls, an old task still
    // stopping can count as available beside three new ones (as availableReplicas does during
    // a Kubernetes rollout), so the count alone does not say the update is over.
    let last_seen = std::sync::Mutex::new(Vec::new());
    let rolled = poll(Duration::from_secs(60), || async {
        let mut answers = Vec::new();
        for _ in 0..16 {
            answers.push(s.invoke("stock", "x").await);
        }
        let new: BTreeSet<&str> = answers
            .iter()
            .filter(|(code, body)| *code == 200 && body.starts_with("v2 "))
            .filter_map(|(_, body)| body.split_whitespace().nth(1))
            .collect();
        let done = new.len() == 4 && answers.iter().all(|(_, b)| b.starts_with("v2 "));
        *last_seen.lock().unwrap() = answers;
        done && s.available("stock").await == 4
    })
    .await;
    let status = s.status("stock").await.1;
    assert!(
        rolled,
        "the update never served 4 of the new version: {:?} {status}",
        last_seen.lock().unwrap()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = load.failed();
    let sent = load.stop().await;
    assert!(sent > 20, "the load ran: {sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the update"
    );
    let seen = answering(&s, 80, "v2").await;
    assert_eq!(seen.len(), 4, "four replicas of the new version: {seen:?}");

    // 4 -> 1.
    assert_eq!(s.scale("stock", 1).await, 202);
    s.wait_available("stock", 1).await;
    assert_eq!(answering(&s, 10, "v2").await.len(), 1);

    // A replica that served is killed: counted once, routed to again once it answers (at the
    // new port its restart got), and its status says nothing once it does.
    let running = || {
        let out = std::process::Command::new("docker")
            .args(["ps", "-q", "--filter"])
            .arg(format!("label=com.faastastic.datacenter={dc}"))
            .args(["--filter", "label=com.faastastic.function=stock"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(
        poll(Duration::from_secs(30), || async { running().len() == 1 }).await,
        "not one container: {:?}",
        running()
    );
    // A task can fail to start on a busy machine (its node's port allocation races other
    // processes' sockets): the engine replaces it and it is counted, rightly. A replica the
    // engine stopped itself (scale-down, update: it exits 0, or 143 on SIGTERM) is never
    // counted. The kill is counted on top of whatever was.
    let before = sample(&s.metrics().await, &restarts).expect("the restarts series");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        !said.lines().any(|l| l.contains("stock.openfaas-fn")
            && (l.contains("exited with status 0") || l.contains("exited with status 143"))),
        "a replica stopped by the engine was counted as a crash: {said}"
    );
    let killed = std::process::Command::new("docker")
        .args(["kill", &running()[0]])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{killed:?}");
    assert!(
        poll(Duration::from_secs(30), || async {
            sample(&s.metrics().await, &restarts) == Some(before + 1.0)
        })
        .await,
        "the kill was not counted once on top of {before}: {:?}",
        sample(&s.metrics().await, &restarts)
    );
    assert!(
        poll(Duration::from_secs(30), || async {
            s.available("stock").await == 1 && s.invoke("stock", "x").await.0 == 200
        })
        .await,
        "the killed replica never served again: {}",
        s.status("stock").await.1
    );
    let (_, status) = s.status("stock").await;
    assert!(
        status["datacenters"][&dc].get("reason").is_none(),
        "{status}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sample(&s.metrics().await, &restarts), Some(before + 1.0));

    // A crashing image: the reason is in the status and the restarts in the metrics.
    let crash = "listen tcp :8081: bind: address already in use";
    let r = s
        .deploy(json!({"service": "crasher", "image": image.0,
            "envProcess": "cat", "envVars": {"crash": crash}}))
        .await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let want = format!("replica exited with status 2: {crash}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (shown, last) = loop {
        let last = s.status("crasher").await.1;
        if last["datacenters"][&dc]["reason"].as_str() == Some(want.as_str()) {
            break (true, last);
        }
        if tokio::time::Instant::now() > deadline {
            break (false, last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(shown, "no reason {want:?} in {last}");
    assert_eq!(last["availableReplicas"].as_u64().unwrap_or(0), 0, "{last}");
    let series = format!(
        "faastastic_replica_restarts_total{{datacenter=\"{dc}\",function_name=\"crasher.openfaas-fn\"}}"
    );
    let restarts = poll(Duration::from_secs(30), || async {
        sample(&s.metrics().await, &series).unwrap_or(0.0) >= 3.0
    })
    .await;
    assert!(restarts, "{series} never counted three restarts");
    // The log says it once per crash loop, with the replica's last lines.
    let said = std::fs::read_to_string(&log).unwrap();
    let warnings: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("crasher") && l.contains(&want))
        .collect();
    assert_eq!(warnings.len(), 1, "{said}");
    assert!(
        said.lines().any(|l| l.contains("WARN")
            && l.contains("stock.openfaas-fn")
            && l.contains("status 137")),
        "the kill is in the log: {said}"
    );
    if platform == "docker" {
        // The function's logs follow each run of the container, each line once.
        let logs = s
            .system_text("/system/logs?name=crasher&follow=false")
            .await;
        let runs = logs.matches("starting").count();
        let crashes = logs.matches("bind: address already in use").count();
        assert!(runs >= 2 && crashes == runs, "{logs}");
    }
    // A function that serves says nothing.
    let (_, status) = s.status("stock").await;
    assert!(
        status["datacenters"][&dc].get("reason").is_none(),
        "{status}"
    );

    assert_eq!(s.remove("crasher").await, 202);
    assert_eq!(s.remove("stock").await, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_image_on_docker_scales_rolls_and_says_why_it_crashes() {
    require_docker();
    stock_image_scales_rolls_and_says_why_it_crashes("docker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_image_on_swarm_scales_rolls_and_says_why_it_crashes() {
    require_swarm();
    stock_image_scales_rolls_and_says_why_it_crashes("swarm").await;
}
