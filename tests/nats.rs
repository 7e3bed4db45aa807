//! NATS JetStream triggers against a real `nats-server` (Debian `nats-server`, JetStream on, a
//! temporary store, a free loopback port): messages on a function's subjects invoke it once
//! each, a failure is delivered again and, after `max_deliver`, goes to the dead-letter
//! subject with its error; headers arrive as request headers; publishers' `Nats-Msg-Id`
//! de-duplicates; and a server that is not there at start stops nothing else.

mod common;

use std::time::Duration;

use common::{free_port, poll, require_program, Options, Proc, Server};
use futures::StreamExt;
use serde_json::{json, Value};

struct Nats {
    proc: Option<Proc>,
    port: u16,
    dir: tempfile::TempDir,
    /// Authentication and TLS flags.
    flags: Vec<String>,
}

impl Nats {
    fn start_on(port: u16) -> Nats {
        Nats::start_with(port, Vec::new())
    }

    fn start_with(port: u16, flags: Vec<String>) -> Nats {
        let mut nats = Nats {
            proc: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            flags,
        };
        nats.start();
        nats
    }

    /// Stops the server (SIGKILL); its store stays for `start`.
    fn kill(&mut self) {
        self.proc = None;
    }

    fn start(&mut self) {
        require_program("nats-server", "nats-server");
        let mut args: Vec<String> = vec![
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-sd".into(),
            self.dir.path().display().to_string(),
        ];
        args.extend(self.flags.iter().cloned());
        let proc = common::spawn_quiet("nats-server", &args);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(proc);
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }
}

fn config(url: &str) -> String {
    format!(
        r#"
[triggers.nats]
url = "{url}"
stream = "jobs"
subjects = ["jobs.>"]
max_deliver = 3
backoff_ms = [100]
max_in_flight = 8
dead_letter_subject = "dead.jobs"
"#
    )
}

fn subscriber(name: &str, subject: &str, command: &str) -> Value {
    json!({"service": name, "image": "local/worker", "envProcess": command,
        "annotations": {"topic": subject}})
}

/// Publishes `payloads` to `subject`, each stored by the stream before the next; the last
/// one's stream sequence.
async fn publish_all(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payloads: impl IntoIterator<Item = String>,
) -> u64 {
    let mut last = 0;
    for payload in payloads {
        last = js
            .publish(subject.to_string(), payload.into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence;
    }
    last
}

/// Waits until the gateway has counted `n` invocations of `name`.
async fn wait_invocations(s: &Server, name: &str, n: f64, secs: u64) {
    assert!(
        poll(Duration::from_secs(secs), || async {
            invocations(s, name).await >= n
        })
        .await,
        "{n} invocations of {name} within {secs} s: {}",
        invocations(s, name).await
    );
}

/// Invocations of `name` counted by the gateway, all status codes.
async fn invocations(s: &Server, name: &str) -> f64 {
    series_sum(s, "gateway_function_invocation_total{", name).await
}

/// The sum of a metric's series for the function `name`.
async fn series_sum(s: &Server, metric: &str, name: &str) -> f64 {
    s.metrics()
        .await
        .lines()
        .filter(|l| {
            l.starts_with(metric) && l.contains(&format!("function_name=\"{name}.openfaas-fn\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the function's consumer exists (it delivers only messages published after).
async fn wait_consuming(js: &async_nats::jetstream::Context, name: &str) {
    assert!(
        poll(Duration::from_secs(20), || async {
            let Ok(mut stream) = js.get_stream("jobs").await else {
                return false;
            };
            let Ok(info) = stream.info().await else {
                return false;
            };
            let _ = info;
            let mut names = stream.consumer_names();
            while let Some(Ok(n)) = names.next().await {
                if n.starts_with(&format!("faastastic_{name}_")) {
                    return true;
                }
            }
            false
        })
        .await,
        "no consumer for {name}"
    );
}

#[tokio::test]
async fn every_message_invokes_once_failures_retry_and_then_go_to_the_dead_letter_subject() {
    let nats = Nats::start_on(free_port());
    let s = Server::with(Options {
        config: Some(&config(&nats.url())),
        ..Default::default()
    });
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut dead = client.subscribe("dead.jobs").await.unwrap();

    // Logs the headers it gets; fails its first delivery when asked to.
    let worker = "sh -c 'cat >/dev/null; echo \"topic=$Http_X_Topic id=$Http_X_Request_Id delivered=$Http_X_Nats_Delivered\" >&2; [ \"$Http_X_Fail_First\" != yes ] || [ \"$Http_X_Nats_Delivered\" -ge 2 ]'";
    assert_eq!(
        s.deploy(subscriber("count", "jobs.count", "cat"))
            .await
            .status(),
        202
    );
    assert_eq!(
        s.deploy(subscriber("flaky", "jobs.flaky", worker))
            .await
            .status(),
        202
    );
    assert_eq!(
        s.deploy(subscriber(
            "broken",
            "jobs.broken",
            "sh -c 'cat >/dev/null; echo no >&2; exit 3'"
        ))
        .await
        .status(),
        202
    );
    assert_eq!(
        s.deploy(subscriber("echo", "jobs.echo", "cat"))
            .await
            .status(),
        202
    );
    for name in ["count", "flaky", "broken", "echo"] {
        wait_consuming(&js, name).await;
    }

    // 1,000 messages, each invoking once.
    publish_all(&js, "jobs.count", (0..1000).map(|i| format!("message {i}"))).await;
    wait_invocations(&s, "count", 1000.0, 60).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        invocations(&s, "count").await,
        1000.0,
        "a message invoked twice"
    );
    let mut stream = js.get_stream("jobs").await.unwrap();
    let mut names = stream.consumer_names();
    let mut consumer = None;
    while let Some(Ok(n)) = names.next().await {
        if n.starts_with("faastastic_count_") {
            consumer = Some(n);
        }
    }
    let info = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&consumer.unwrap())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        (info.num_pending, info.num_ack_pending, info.num_redelivered),
        (0, 0, 0),
        "{info:?}"
    );
    let _ = stream.info().await;

    // A failed first delivery is delivered again; the headers arrive.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-Request-Id", "req-42");
    headers.insert("X-Fail-First", "yes");
    js.publish_with_headers("jobs.flaky", headers, "work".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        poll(Duration::from_secs(15), || async {
            s.system_text("/system/logs?name=flaky&tail=10")
                .await
                .contains("delivered=2")
        })
        .await,
        "a second delivery"
    );
    let logs = s.system_text("/system/logs?name=flaky&tail=10").await;
    assert!(
        logs.contains("topic=jobs.flaky id=req-42 delivered=1"),
        "{logs}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        invocations(&s, "flaky").await,
        2.0,
        "acknowledged after the 2xx"
    );

    // A message that fails every delivery goes to the dead-letter subject, with its error.
    js.publish("jobs.broken", "poison".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(15), dead.next())
        .await
        .expect("a dead letter within 15 s")
        .unwrap();
    assert_eq!(&letter.payload[..], b"poison");
    let h = letter.headers.unwrap();
    assert_eq!(
        h.get("Faastastic-Function").unwrap().as_str(),
        "broken.openfaas-fn"
    );
    assert_eq!(h.get("Faastastic-Subject").unwrap().as_str(), "jobs.broken");
    assert_eq!(h.get("Faastastic-Deliveries").unwrap().as_str(), "3");
    assert!(
        h.get("Faastastic-Error")
            .unwrap()
            .as_str()
            .starts_with("500"),
        "{h:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        invocations(&s, "broken").await,
        3.0,
        "max_deliver deliveries, then no more"
    );
    let metrics = s.metrics().await;
    assert!(metrics.contains("faastastic_trigger_runs_total{function_name=\"broken.openfaas-fn\",outcome=\"dead-lettered\",trigger=\"nats\"} 1"), "{metrics}");
    assert!(metrics.contains("faastastic_trigger_up{trigger=\"nats\"} 1"));

    // Request/reply: the answer goes to the subject the message names.
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Faastastic-Reply-To", inbox.as_str());
    js.publish_with_headers("jobs.echo", headers, "ping".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("a reply within 10 s")
        .unwrap();
    assert_eq!(&answer.payload[..], b"ping");
    assert_eq!(
        answer
            .headers
            .unwrap()
            .get("Faastastic-Status")
            .unwrap()
            .as_str(),
        "200"
    );

    // Publishers' Nats-Msg-Id de-duplicates.
    for _ in 0..3 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "order-7");
        js.publish_with_headers("jobs.count", headers, "once".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_invocations(&s, "count", 1001.0, 10).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(invocations(&s, "count").await, 1001.0);
}

#[tokio::test]
async fn without_nats_functions_deploy_and_serve_and_messages_flow_once_it_starts() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let s = Server::with(Options {
        config: Some(&config(&url)),
        ..Default::default()
    });
    // A subject that is not one is refused at deploy, naming the annotation.
    let r = s.deploy(subscriber("bad", "jobs..x", "cat")).await;
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("annotations.topic: \"jobs..x\" is not a NATS subject"));

    assert_eq!(
        s.deploy(subscriber("late", "jobs.late", "cat"))
            .await
            .status(),
        202
    );
    s.wait_available("late", 1).await;
    assert_eq!(
        s.invoke("late", "over http").await,
        (200, "over http".to_string())
    );
    let overview: Value = s.get_json("/system/overview").await;
    assert_eq!(overview["triggers"], json!([{"name": "nats", "up": false}]));
    assert!(s
        .metrics()
        .await
        .contains("faastastic_trigger_up{trigger=\"nats\"} 0"));

    let nats = Nats::start_on(port);
    assert!(
        poll(Duration::from_secs(20), || async {
            let o: Value = s.get_json("/system/overview").await;
            o["triggers"][0]["up"] == true
        })
        .await,
        "the trigger comes up once the server is there"
    );
    let js = async_nats::jetstream::new(nats.client().await);
    wait_consuming(&js, "late").await;
    js.publish("jobs.late", "by message".into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_invocations(&s, "late", 2.0, 15).await;
}

#[tokio::test]
async fn a_backlog_wakes_a_dormant_function_scales_it_out_and_it_returns_to_zero() {
    let nats = Nats::start_on(free_port());
    let cfg = format!(
        "{}\n[autoscale]\ntick_interval_ms = 250\n[[autoscale.queries]]\nname = \"backlog\"\nsource = \"nats\"\ntarget = 50\ninterval_ms = 500\n",
        config(&nats.url())
    );
    let s = Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    });
    let mut f = subscriber("drain", "jobs.drain", "sh -c 'cat >/dev/null; sleep 0.05'");
    f["labels"] = json!({
        "com.faastastic.scale.initial": "0",
        "com.openfaas.scale.max": "4",
        "com.openfaas.scale.zero": "true",
        "com.openfaas.scale.zero-duration": "2s",
    });
    assert_eq!(s.deploy(f).await.status(), 202);
    let js = async_nats::jetstream::new(nats.client().await);
    wait_consuming(&js, "drain").await;
    assert_eq!(
        s.status("drain").await.1["replicas"],
        Value::Null,
        "dormant"
    );
    publish_all(&js, "jobs.drain", (0..1000).map(|i| i.to_string())).await;
    assert!(
        poll(Duration::from_secs(30), || async {
            let events: Vec<Value> = s
                .get_json("/system/scale-events?function=drain&limit=100")
                .await;
            events
                .iter()
                .any(|e| e["source"] == "query:backlog" && e["to"] == 4 && e["outcome"] == "scaled")
        })
        .await,
        "the backlog took it to max: {:?}",
        s.get_json::<Value>("/system/scale-events?function=drain&limit=100")
            .await
    );
    wait_invocations(&s, "drain", 1000.0, 60).await;
    assert!(
        poll(Duration::from_secs(30), || async {
            s.status("drain").await.1["replicas"].is_null()
        })
        .await,
        "back to zero once the backlog is gone: {:?}",
        s.get_json::<Value>("/system/scale-events?function=drain&limit=10")
            .await
    );
    assert_eq!(invocations(&s, "drain").await, 1000.0);
}

/// The consumer of `name`'s subject: (pending, unacknowledged, acknowledged up to this stream
/// sequence).
async fn consumer_state(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Option<(u64, usize, u64)> {
    let stream = js.get_stream("jobs").await.ok()?;
    let mut names = stream.consumer_names();
    while let Some(Ok(n)) = names.next().await {
        if n.starts_with(&format!("faastastic_{name}_")) {
            let info = stream.consumer_info(&n).await.ok()?;
            return Some((
                info.num_pending,
                info.num_ack_pending,
                info.ack_floor.stream_sequence,
            ));
        }
    }
    None
}

#[tokio::test]
async fn nothing_is_lost_when_faastastic_or_nats_dies_mid_stream() {
    let mut nats = Nats::start_on(free_port());
    let cfg = format!("{}ack_wait_secs = 2\n", config(&nats.url()));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = || {
        Server::with(Options {
            config: Some(&cfg),
            data_dir: Some(&data),
            ..Default::default()
        })
    };
    let mut s = start();
    assert_eq!(
        s.deploy(subscriber(
            "ledger",
            "jobs.ledger",
            "sh -c 'cat >/dev/null; sleep 0.02'"
        ))
        .await
        .status(),
        202
    );
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    wait_consuming(&js, "ledger").await;
    let publish = |from: usize| {
        let js = js.clone();
        async move {
            publish_all(
                &js,
                "jobs.ledger",
                (from..from + 500).map(|i| i.to_string()),
            )
            .await
        }
    };

    // faastastic killed (SIGKILL) with messages in flight, then restarted.
    let last = publish(0).await;
    wait_invocations(&s, "ledger", 50.0, 20).await;
    s.kill();
    let before = consumer_state(&js, "ledger").await.unwrap();
    assert!(before.2 < last, "the kill came mid-stream: {before:?}");
    let s = start();
    assert!(
        poll(Duration::from_secs(60), || async {
            consumer_state(&js, "ledger").await == Some((0, 0, last))
        })
        .await,
        "every message acknowledged after the restart: {:?}, last {last}",
        consumer_state(&js, "ledger").await
    );

    // nats-server killed mid-stream and restarted on its store.
    let last = publish(500).await;
    let base = invocations(&s, "ledger").await;
    assert!(
        poll(Duration::from_secs(20), || async {
            invocations(&s, "ledger").await >= base + 50.0
        })
        .await
    );
    nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        poll(Duration::from_secs(10), || async {
            s.metrics()
                .await
                .contains("faastastic_trigger_up{trigger=\"nats\"} 0")
        })
        .await,
        "the outage shows"
    );
    assert_eq!(s.invoke("ledger", "http still works").await.0, 200);
    nats.start();
    let js = async_nats::jetstream::new(nats.client().await);
    assert!(
        poll(Duration::from_secs(60), || async {
            consumer_state(&js, "ledger").await == Some((0, 0, last))
        })
        .await,
        "every message acknowledged after NATS came back: {:?}, last {last}",
        consumer_state(&js, "ledger").await
    );
    assert!(invocations(&s, "ledger").await >= base + 1.0);
}

#[tokio::test]
async fn a_slow_function_holds_up_only_its_own_subject_and_at_most_max_in_flight() {
    let nats = Nats::start_on(free_port());
    let s = Server::with(Options {
        config: Some(&config(&nats.url())),
        ..Default::default()
    });
    let slow = "sh -c 'cat >/dev/null; sleep 30'";
    assert_eq!(
        s.deploy(subscriber("slow", "jobs.slow", slow))
            .await
            .status(),
        202
    );
    assert_eq!(
        s.deploy(subscriber("fast", "jobs.fast", "cat"))
            .await
            .status(),
        202
    );
    let js = async_nats::jetstream::new(nats.client().await);
    wait_consuming(&js, "slow").await;
    wait_consuming(&js, "fast").await;
    publish_all(&js, "jobs.slow", (0..20).map(|i| i.to_string())).await;
    publish_all(&js, "jobs.fast", (0..50).map(|i| i.to_string())).await;
    // Not held up by the slow function.
    wait_invocations(&s, "fast", 50.0, 10).await;
    // max_in_flight (8) of the slow function's messages are being handled; the server holds
    // the other 12.
    let started = series_sum(&s, "gateway_function_invocation_started{", "slow").await;
    assert_eq!(started, 8.0);
    assert_eq!(
        consumer_state(&js, "slow").await.map(|c| (c.0, c.1)),
        Some((12, 8))
    );
}

#[tokio::test]
async fn a_server_that_requires_a_token_and_tls_is_reached_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new(dir.path(), "nats-ca");
    let (cert, key) = ca.issue(dir.path(), "nats", &["127.0.0.1"], false);
    let nats = Nats::start_with(
        free_port(),
        vec![
            "--auth".into(),
            "s3cret-token".into(),
            "--tls".into(),
            "--tlscert".into(),
            cert.display().to_string(),
            "--tlskey".into(),
            key.display().to_string(),
        ],
    );
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let with_token = |token: &str| {
        let file = dir.path().join(format!("token-{token}"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        format!(
            "{}token_file = \"{}\"\nca_file = \"{}\"\n",
            config(&url),
            file.display(),
            ca.file.display()
        )
    };
    let good = with_token("s3cret-token");
    let s = Server::with(Options {
        config: Some(&good),
        ..Default::default()
    });
    assert_eq!(
        s.deploy(subscriber("secure", "jobs.secure", "cat"))
            .await
            .status(),
        202
    );
    let client = async_nats::ConnectOptions::with_token("s3cret-token".into())
        .add_root_certificates(ca.file.clone())
        .require_tls(true)
        .connect(url.as_str())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    wait_consuming(&js, "secure").await;
    js.publish("jobs.secure", "over tls".into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_invocations(&s, "secure", 1.0, 15).await;
    // A wrong token: nothing connects, and the trigger says so.
    let bad = with_token("wrong-token");
    let s = Server::with(Options {
        config: Some(&bad),
        ..Default::default()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let overview: Value = s.get_json("/system/overview").await;
    assert_eq!(overview["triggers"], json!([{"name": "nats", "up": false}]));
}
