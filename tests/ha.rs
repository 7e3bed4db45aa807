//! Several faastastic instances on one PostgreSQL database (Debian's, started here), with one
//! remote datacenter (a `faastastic agent`) they all reach: every instance serves the whole
//! API, one leads the loops that run once, and another takes over when it dies.

mod common;

use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::{alert_payload, echo_function, free_port, poll, sample, Agent, Options, Server};
use reqwest::Method;
use serde_json::{json, Value};

/// A datacenter `lon` served by an agent, and what keeps both alive.
struct Cluster {
    pg: Postgres,
    _agent: Agent,
    dir: tempfile::TempDir,
    config: String,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with("")
    }

    /// With more configuration (e.g. query policies) for every instance.
    fn with(extra: &str) -> Cluster {
        let pg = Postgres::start();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let agent = Agent::start("lon", port, dir.path());
        let password = dir.path().join("pg-password");
        std::fs::write(&password, common::postgres::PASSWORD).unwrap();
        let config = format!(
            "reconcile_interval_ms = 300\n\
             [store]\nurl = \"{}\"\npassword_file = \"{}\"\n\
             [[datacenters]]\nname = \"lon\"\nplatform = \"remote\"\nurl = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            pg.url_without_password("faastastic"),
            password.display(),
            dir.path().join("token").display()
        ) + extra;
        Cluster {
            pg,
            _agent: agent,
            dir,
            config,
        }
    }

    /// Three instances, `a`, `b` and `c`.
    fn three(&self) -> [Server; 3] {
        [self.instance("a"), self.instance("b"), self.instance("c")]
    }

    /// One more instance, with a data directory of its own.
    fn instance(&self, name: &str) -> Server {
        let data = self.dir.path().join(name);
        Server::with(Options {
            config: Some(&self.config),
            data_dir: Some(&data),
            ..Default::default()
        })
    }
}

async fn is_leader(s: &Server) -> bool {
    sample(&s.metrics().await, "faastastic_leader") == Some(1.0)
}

async fn overview(s: &Server) -> Value {
    s.get_json("/system/overview").await
}

/// The instances that say they lead, by index.
async fn leaders(servers: &[&Server]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        if is_leader(s).await {
            out.push(i);
        }
    }
    out
}

async fn events(s: &Server, query: &str) -> Vec<Value> {
    s.get_json(&format!("/system/scale-events{query}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_serves_what_another_changed() {
    let cluster = Cluster::new();
    let [a, b, c] = cluster.three();
    assert_eq!(a.deploy(echo_function("echo")).await.status(), 202);
    // Visible through the others within a second.
    let started = Instant::now();
    for s in [&b, &c] {
        assert!(
            poll(Duration::from_secs(1), || async {
                s.status("echo").await.0 == 200
            })
            .await,
            "a deploy through one instance is not visible through another"
        );
    }
    let seen_in = started.elapsed();
    c.wait_available("echo", 1).await;
    let (code, body) = c.invoke("echo", "through c").await;
    assert_eq!((code, body.as_str()), (200, "through c"));

    // A scale through b, seen by a and carried out once.
    assert_eq!(b.scale("echo", 3).await, 202);
    assert!(
        poll(Duration::from_secs(1), || async {
            a.status("echo").await.1["replicas"] == 3
        })
        .await
    );
    a.wait_available("echo", 3).await;

    // A secret and a pause made through one are there through another.
    let r = a
        .system(Method::POST, "/system/secrets")
        .json(&json!({"name": "api-key", "value": "s3cret"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let secrets: Value = c.get_json("/system/secrets").await;
    assert_eq!(secrets[0]["name"], "api-key", "{secrets}");
    let r = b
        .system(Method::POST, "/system/autoscaling/pause")
        .json(&json!({"reason": "freeze"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert!(
        poll(Duration::from_secs(1), || async {
            overview(&c).await["paused"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        })
        .await,
        "a pause through b is not seen by c"
    );

    // Removed through c: gone through a.
    assert_eq!(c.remove("echo").await, 202);
    assert!(
        poll(Duration::from_secs(1), || async {
            a.status("echo").await.0 == 404
        })
        .await
    );
    eprintln!("a deploy was visible through the other instances after {seen_in:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_another_within_three_seconds_of_its_death() {
    let cluster = Cluster::new();
    let mut servers = cluster.three();
    let refs: Vec<&Server> = servers.iter().collect();
    assert!(
        poll(Duration::from_secs(5), || async {
            leaders(&refs).await.len() == 1
        })
        .await,
        "no single leader"
    );
    let first = leaders(&refs).await[0];
    // Every instance names the same leader, and it names itself.
    let named = overview(refs[first]).await["instance"].clone();
    assert_eq!(named["leader"], true);
    for s in &refs {
        let o = overview(s).await;
        assert_eq!(o["instance"]["leaderInstance"], named["id"], "{o}");
        assert_eq!(o["instance"]["store"], "postgres");
    }

    servers[first].kill();
    let killed = Instant::now();
    let rest: Vec<&Server> = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, s)| s)
        .collect();
    let mut took = None;
    while killed.elapsed() < Duration::from_secs(10) {
        if leaders(&rest).await.len() == 1 {
            took = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = took.expect("no new leader within 10 s of the leader's death");
    eprintln!("a new leader {took:?} after kill -9 of the old one");
    assert!(took <= Duration::from_secs(3), "failover took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_delivered_to_two_instances_scales_once() {
    let cluster = Cluster::new();
    let (a, b) = (cluster.instance("a"), cluster.instance("b"));
    let mut f = echo_function("api");
    f["labels"] = json!({"com.openfaas.scale.max": "10"});
    assert_eq!(a.deploy(f).await.status(), 202);
    assert!(
        poll(Duration::from_secs(1), || async {
            b.status("api").await.0 == 200
        })
        .await
    );
    let payload = alert_payload(
        "firing",
        "fp-1",
        json!({"alertname": "APIHighInvocationRate", "function_name": "api"}),
    );
    // Alertmanager retrying to another instance while the first still works on it.
    for _ in 0..3 {
        let (ra, rb) = tokio::join!(a.post_alert(&payload), b.post_alert(&payload));
        assert_eq!(ra.status(), 200);
        assert_eq!(rb.status(), 200);
    }
    let scaled: Vec<Value> = events(&a, "?function=api")
        .await
        .into_iter()
        .filter(|e| e["outcome"] == "scaled")
        .collect();
    assert_eq!(scaled.len(), 1, "applied more than once: {scaled:?}");
    assert_eq!(b.status("api").await.1["replicas"], 2, "one step up from 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_lost_and_back() {
    let mut cluster = Cluster::new();
    let a = cluster.instance("a");
    let b = cluster.instance("b");
    assert_eq!(a.deploy(echo_function("echo")).await.status(), 202);
    b.wait_available("echo", 1).await;

    cluster.pg.down();
    // Invocations go on from what each instance knows.
    for s in [&a, &b] {
        let (code, body) = s.invoke("echo", "still here").await;
        assert_eq!((code, body.as_str()), (200, "still here"));
    }
    // A change cannot be stored: 503, saying why, and nothing half done.
    let r = a.deploy(echo_function("other")).await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert!(
        poll(Duration::from_secs(4), || async {
            sample(&b.metrics().await, "faastastic_store_up") == Some(0.0)
        })
        .await
    );
    assert!(
        poll(Duration::from_secs(4), || async {
            !is_leader(&a).await && !is_leader(&b).await
        })
        .await,
        "a leader without its database goes on acting"
    );

    cluster.pg.up();
    assert!(
        poll(Duration::from_secs(10), || async {
            a.deploy(echo_function("other")).await.status() == 202
        })
        .await,
        "changes are not accepted once the database is back"
    );
    assert!(
        poll(Duration::from_secs(2), || async {
            b.status("other").await.0 == 200
        })
        .await
    );
    assert!(
        poll(Duration::from_secs(5), || async {
            leaders(&[&a, &b]).await.len() == 1
        })
        .await
    );
    // Nothing stored before was lost.
    assert_eq!(b.status("echo").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_during_a_scale_up_and_the_next_one_finishes_it() {
    let cluster = Cluster::with(
        "[[autoscale.queries]]\nname = \"own-rate\"\nsource = \"internal\"\nwindow_secs = 2\ntarget = 10\ninterval_ms = 200\n",
    );
    let mut servers = cluster.three();
    let refs: Vec<&Server> = servers.iter().collect();
    assert!(
        poll(Duration::from_secs(5), || async {
            leaders(&refs).await.len() == 1
        })
        .await
    );
    let leader = leaders(&refs).await[0];
    let other = (leader + 1) % 3;
    let mut f = echo_function("busy");
    // One replica a decision, a second apart: the scale-up takes a few decisions.
    f["labels"] = json!({
        "com.openfaas.scale.max": "4",
        "com.faastastic.scale.max-step-up": "1",
        "com.faastastic.scale.up-cooldown": "1s",
    });
    assert_eq!(refs[other].deploy(f).await.status(), 202);
    refs[other].wait_available("busy", 1).await;
    // The load goes through an instance that does not lead: the leader reads its counters.
    let load = common::Load::start(refs[other], "busy", 40, Duration::from_secs(40));
    assert!(
        poll(Duration::from_secs(15), || async {
            refs[other].status("busy").await.1["replicas"].as_u64() >= Some(2)
        })
        .await,
        "the leader did not scale on another instance's traffic"
    );
    drop(refs);
    servers[leader].kill();
    let survivor = &servers[other];
    assert!(
        poll(Duration::from_secs(20), || async {
            survivor.status("busy").await.1["replicas"] == 4
        })
        .await,
        "the scale-up did not go on after the leader died"
    );
    load.stop().await;
    // The audit trail: one chain of steps, none lost or applied twice.
    let mut scaled: Vec<Value> = events(survivor, "?function=busy")
        .await
        .into_iter()
        .filter(|e| e["outcome"] == "scaled" && e["direction"] == "up")
        .collect();
    scaled.reverse();
    let steps: Vec<(u64, u64)> = scaled
        .iter()
        .map(|e| (e["from"].as_u64().unwrap(), e["to"].as_u64().unwrap()))
        .collect();
    assert_eq!(steps, vec![(1, 2), (2, 3), (3, 4)], "{scaled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_runs_once_per_due_time_among_instances() {
    let cluster = Cluster::new();
    let [a, b, c] = cluster.three();
    let f = json!({"service": "tick", "image": "local/cron", "envProcess": "cat",
        "annotations": {"topic": "cron-function", "schedule": "* * * * * *"}});
    assert_eq!(b.deploy(f).await.status(), 202);
    let ok = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["outcome"] == "ok")
            .filter_map(|e| e["due"].as_str().map(str::to_string))
            .collect::<Vec<String>>()
    };
    assert!(
        poll(Duration::from_secs(15), || async {
            let e: Vec<Value> = c
                .get_json("/system/trigger-events?function=tick&limit=1000")
                .await;
            ok(&e).len() >= 4
        })
        .await,
        "the schedule does not run"
    );
    let e: Vec<Value> = a
        .get_json("/system/trigger-events?function=tick&limit=1000")
        .await;
    let dues = ok(&e);
    let unique: std::collections::HashSet<&String> = dues.iter().collect();
    assert_eq!(unique.len(), dues.len(), "a due time ran twice: {dues:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_at_zero_wakes_through_any_instance() {
    let cluster = Cluster::new();
    let servers = [cluster.instance("a"), cluster.instance("b")];
    let refs: Vec<&Server> = servers.iter().collect();
    assert!(
        poll(Duration::from_secs(5), || async {
            leaders(&refs).await.len() == 1
        })
        .await
    );
    let follower = refs[(leaders(&refs).await[0] + 1) % 2];
    let mut f = echo_function("dormant");
    f["labels"] = json!({"com.faastastic.scale.initial": "0"});
    assert_eq!(follower.deploy(f).await.status(), 202);
    let replicas = follower.status("dormant").await.1["replicas"].as_u64();
    assert_eq!(replicas.unwrap_or(0), 0, "deployed at zero");
    let (code, body) = follower.invoke("dormant", "wake up").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "wake up"),
        "not woken through a follower"
    );
    let woken: Vec<Value> = events(follower, "?function=dormant").await;
    assert_eq!(woken[0]["source"], "wake", "{woken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_webhook_through_one_instance_with_a_small_pool() {
    // Four connections: decisions hold one each for their lock and need another for their
    // reads and writes, while the lease renews on a connection of its own.
    let cluster = Cluster::with("");
    let config = cluster
        .config
        .replace("[store]\n", "[store]\npool_size = 4\n");
    let a = Server::with(Options {
        config: Some(&config),
        data_dir: Some(&cluster.dir.path().join("a")),
        ..Default::default()
    });
    for i in 0..20 {
        let mut f = echo_function(&format!("f{i}"));
        f["labels"] = json!({"com.openfaas.scale.max": "1", "com.faastastic.scale.initial": "0"});
        assert_eq!(a.deploy(f).await.status(), 202);
    }
    let alerts: Vec<Value> = (0..200)
        .map(|i| {
            json!({"status": "firing", "fingerprint": format!("fp{i}"),
                "startsAt": "2026-01-01T00:00:00Z",
                "labels": {"alertname": "APIHighInvocationRate", "function_name": format!("f{}", i % 20)}})
        })
        .collect();
    let payload =
        json!({"version": "4", "status": "firing", "receiver": "faastastic", "alerts": alerts});
    let started = Instant::now();
    let r = a.post_alert(&payload).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["alerts"].as_array().unwrap().len(), 200);
    assert!(
        body["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["outcome"] != "failed"),
        "{body}"
    );
    eprintln!("200 alerts decided in {:?}", started.elapsed());
    assert!(is_leader(&a).await, "the leader lost its lease while busy");
}
