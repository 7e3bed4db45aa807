//! TLS between datacenters, with certificates made by the test (rcgen) on loopback: a control
//! plane and an agent with mutual TLS (deploy, scale, invoke through the lane and the general
//! path), client certificates from another CA or expired refused and named on both sides, a
//! server certificate from an unknown CA refused, and the agent's certificate rotated under
//! load without a failed invocation; a TLS gateway (HTTP/2 and HTTP/1.1, idle HTTP/2
//! connections closed) scraped and called by real Prometheus and Alertmanager.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::tls::Ca;
use common::{echo_function, free_port, poll, Agent, Load, Options, Server};
use serde_json::json;

/// An agent for datacenter `far` serving TLS with `cert`, requiring client certificates
/// signed by `client_ca`; its warnings go to `dir/agent.log`.
fn tls_agent(dir: &Path, port: u16, cert: &(PathBuf, PathBuf), client_ca: &Path) -> Agent {
    let args: Vec<&OsStr> = vec![
        OsStr::new("--tls-cert"),
        cert.0.as_os_str(),
        OsStr::new("--tls-key"),
        cert.1.as_os_str(),
        OsStr::new("--client-ca"),
        client_ca.as_os_str(),
    ];
    Agent::start_with("far", port, dir, &args, Some(&dir.join("agent.log")))
}

/// A control plane whose datacenter `far` is the agent at `port`, over TLS trusting `ca`
/// and presenting `client` (if any).
fn control_plane(dir: &Path, port: u16, ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> Server {
    control_plane_naming(dir, port, ca, client, "agent.test")
}

/// [`control_plane`], checking the agent's certificate for `server_name`.
fn control_plane_naming(
    dir: &Path,
    port: u16,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    server_name: &str,
) -> Server {
    let client = client
        .map(|(c, k)| {
            format!(
                "cert_file = {:?}\nkey_file = {:?}\n",
                c.display().to_string(),
                k.display().to_string()
            )
        })
        .unwrap_or_default();
    let cfg = format!(
        "[[datacenters]]\nname = \"home\"\nhome = true\n[[datacenters]]\nname = \"far\"\nplatform = \"remote\"\nurl = \"https://127.0.0.1:{port}\"\ntoken_file = {:?}\nca_file = {:?}\nserver_name = {server_name:?}\n{client}",
        dir.join("token").display().to_string(),
        ca.display().to_string(),
    );
    Server::with(Options {
        config: Some(&cfg),
        ..Default::default()
    })
}

fn pinned(name: &str) -> serde_json::Value {
    let mut f = echo_function(name);
    f["constraints"] = json!(["datacenter==far"]);
    f
}

/// The certificate the agent presents to a new connection now.
async fn presented(port: u16, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in faastastic::tls::certificates(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("agent.test").unwrap();
    // The agent asks for a client certificate; without one the handshake still shows the
    // server's before the agent refuses it (TLS 1.3 sends it first).
    match connector.connect(name, tcp).await {
        Ok(tls) => tls.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        Err(e) => panic!("no handshake with the agent: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenters_speak_mutual_tls_and_refuse_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let other = Ca::new(d, "other-ca");
    // Named agent.test only: the control plane reaches 127.0.0.1 and checks server_name.
    let server_cert = ca.issue(d, "agent", &["agent.test"], false);
    let client = ca.issue(d, "control-plane", &["control-plane.test"], false);
    let port = free_port();
    let _agent = tls_agent(d, port, &server_cert, &ca.file);
    let s = control_plane(d, port, &ca.file, Some(&client));

    // Deploy, scale and invoke in the TLS datacenter: plain (through the lane, which hands
    // it over) and chunked (the general path).
    let r = s.deploy(pinned("far-echo")).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    s.wait_available("far-echo", 1).await;
    assert_eq!(
        s.invoke("far-echo", "over tls").await,
        (200, "over tls".into())
    );
    let (code, text) = s.invoke_chunked("far-echo", "hello").await;
    assert_eq!(code, 200, "{text}");
    assert!(text.ends_with("hello"), "{text}");
    assert_eq!(s.scale("far-echo", 2).await, 202);
    s.wait_available("far-echo", 2).await;

    // The agent's certificate rotates under load: no invocation fails, new connections get
    // the new certificate.
    let before = presented(port, &ca.file).await;
    let load = Load::start(&s, "far-echo", 20, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let staged = ca.issue(d, "agent-next", &["agent.test"], false);
    std::fs::rename(&staged.1, &server_cert.1).unwrap();
    std::fs::rename(&staged.0, &server_cert.0).unwrap();
    let rotated = poll(Duration::from_secs(10), || async {
        presented(port, &ca.file).await != before
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = load.failed();
    let sent = load.stop().await;
    assert!(rotated, "the agent never presented its new certificate");
    assert!(sent > 20, "the load ran: {sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} invocations failed across the rotation"
    );
    assert_eq!(s.invoke("far-echo", "after").await, (200, "after".into()));

    // A control plane with a certificate from another CA, or an expired one, or none at
    // all, is refused; the API's error names the datacenter, the agent's log says why.
    let refused_client = "the agent refused this control plane's client certificate";
    let cases = [
        (
            "another CA",
            Some(other.issue(d, "stranger", &["x.test"], false)),
            "unknownissuer",
            refused_client,
        ),
        (
            "expired",
            Some(ca.issue(d, "old", &["old.test"], true)),
            "expired",
            "client certificate has expired",
        ),
        ("none", None, "certificate", refused_client),
    ];
    for (what, cert, why, hint) in cases {
        let log_before = std::fs::read_to_string(d.join("agent.log")).unwrap().len();
        let stranger = control_plane(d, port, &ca.file, cert.as_ref());
        let r = stranger.deploy(pinned("nope")).await;
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            code == 502 && text.contains("far") && text.contains(hint),
            "{what}: {code} {text}"
        );
        let log = std::fs::read_to_string(d.join("agent.log")).unwrap();
        assert!(
            log[log_before..].contains("refused a client's TLS handshake")
                && log[log_before..].to_lowercase().contains(why),
            "{what}: the agent's log says nothing of {why:?}:\n{}",
            &log[log_before..]
        );
    }

    // The agent's client CA file gains the other CA beside its own (a CA rotation): a
    // control plane with a certificate from it gets in, without a restart of the agent.
    let newcomer_cert = other.issue(d, "newcomer", &["newcomer.test"], false);
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(&ca.file).unwrap(),
        std::fs::read_to_string(&other.file).unwrap()
    );
    let staged = d.join("ca-bundle.pem");
    std::fs::write(&staged, bundle).unwrap();
    std::fs::rename(&staged, &ca.file).unwrap();
    let newcomer = control_plane(d, port, &ca.file, Some(&newcomer_cert));
    let joined = poll(Duration::from_secs(10), || async {
        newcomer.deploy(pinned("newcomer")).await.status() == 202
    })
    .await;
    assert!(joined, "the agent never took its rotated client CA");

    // A control plane that does not trust the agent's CA, or checks another name, refuses
    // it, and says so.
    for (ca_file, name, hint) in [
        (
            &other.file,
            "agent.test",
            "set ca_file to the CA that signed it",
        ),
        (
            &ca.file,
            "elsewhere.test",
            "set server_name to one it carries",
        ),
    ] {
        let wary = control_plane_naming(d, port, ca_file, Some(&client), name);
        let r = wary.deploy(pinned("nope")).await;
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            code == 502
                && text.contains("far")
                && text.contains("invalid peer certificate")
                && text.contains(hint),
            "{name}: {code} {text}"
        );
    }
}

/// A TLS connection to `addr` (whose certificate `ca` signed) offering `protocols` by ALPN.
async fn tls_client(
    addr: &str,
    ca: &Path,
    protocols: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in faastastic::tls::certificates(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The ALPN protocol a TLS client offering `protocols` agrees with the server at `addr`.
async fn negotiated(addr: &str, ca: &Path, protocols: &[&[u8]]) -> Option<Vec<u8>> {
    let tls = tls_client(addr, ca, protocols).await;
    tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// An HTTP/2 connection to `addr` over TLS, and a task that ends when the server closes it.
async fn h2_connect(addr: &str, ca: &Path) -> (H2Sender, tokio::task::JoinHandle<()>) {
    let tls = tls_client(addr, ca, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, ended)
}

/// Sends one request on an HTTP/2 connection: its status and body.
async fn h2_send(
    sender: &mut H2Sender,
    method: &str,
    uri: String,
    auth: Option<&str>,
    body: &str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(uri);
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    sender.ready().await.unwrap();
    let r = sender.send_request(req).await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Whether `ended` finishes within `within`.
async fn closed_within(ended: &mut tokio::task::JoinHandle<()>, within: Duration) -> bool {
    tokio::time::timeout(within, ended).await.is_ok()
}

/// A gateway (auth on) serving TLS with a certificate for localhost and 127.0.0.1 from a CA
/// made in `d`, with `config` beside its `[tls]` table: it and the CA.
fn tls_gateway(d: &Path, config: &str) -> (Server, Ca) {
    let ca = Ca::new(d, "ca");
    let (cert, key) = ca.issue(d, "gateway", &["localhost", "127.0.0.1"], false);
    let cfg = format!(
        "{config}[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let s = Server::with(Options {
        auth: true,
        config: Some(&cfg),
        ca_file: Some(&ca.file),
        ..Default::default()
    });
    (s, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_tls_to_clients_prometheus_and_alertmanager() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let metrics_port = free_port();
    let (s, ca) = tls_gateway(
        d,
        &format!(
            "[autoscale]\nup_cooldown_secs = 1\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
        ),
    );
    assert!(s.base.starts_with("https://"), "{}", s.base);

    // HTTP/2 or HTTP/1.1 by ALPN; the metrics listener is TLS too; a client that does not
    // trust the CA, or speaks plain HTTP, gets no answer.
    assert_eq!(
        negotiated(&s.addr(), &ca.file, &[b"h2", b"http/1.1"])
            .await
            .as_deref(),
        Some(&b"h2"[..])
    );
    assert_eq!(
        negotiated(&s.addr(), &ca.file, &[b"http/1.1"])
            .await
            .as_deref(),
        Some(&b"http/1.1"[..])
    );
    let trusted = common::client_trusting(Some(&ca.file));
    let metrics = trusted
        .get(format!("https://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(reqwest::Client::new()
        .get(s.url("/healthz"))
        .send()
        .await
        .is_err());
    let plain = reqwest::get(format!("http://{}/healthz", s.addr())).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // Real Prometheus scrapes it over TLS and real Alertmanager posts to its webhook over
    // TLS: a load scales the function up.
    let mut f = echo_function("hot");
    f["labels"] = json!({"com.openfaas.scale.max": "4", "com.openfaas.scale.factor": "25"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("hot", 1).await;
    let rules = common::step_rule(d);
    let alertmanager = common::fast_alertmanager(&s);
    let _monitoring = common::Monitoring::start(&s, &[rules], Some(alertmanager), &[]).await;
    let load = Load::start(&s, "hot", 20, Duration::from_secs(90));
    let scaled = poll(Duration::from_secs(60), || async {
        s.status("hot").await.1["replicas"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let failed = load.failed();
    load.stop().await;
    assert!(
        scaled,
        "no scale-up through Prometheus and Alertmanager over TLS"
    );
    assert_eq!(failed, 0);
    let events: serde_json::Value = s.get_json("/system/scale-events?name=hot").await;
    assert!(
        events[0]["source"] == "alert" && events[0]["evidence"]["receiver"] == "scale-up",
        "the scale came from Alertmanager's webhook: {events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_client_ca_lets_in_only_the_clients_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let (cert, key) = ca.issue(d, "gateway", &["127.0.0.1"], false);
    let clients = Ca::new(d, "clients");
    let (client_cert, client_key) = clients.issue(d, "operator", &["operator.test"], false);
    let cfg = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca = {:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        clients.file.display().to_string()
    );
    let s = Server::with(Options {
        config: Some(&cfg),
        ca_file: Some(&ca.file),
        ..Default::default()
    });
    let without = common::client_trusting(Some(&ca.file))
        .get(s.url("/healthz"))
        .send()
        .await;
    assert!(without.is_err(), "a client without a certificate got in");
    let pem = [
        std::fs::read(&client_cert).unwrap(),
        std::fs::read(&client_key).unwrap(),
    ]
    .concat();
    let with = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca.file).unwrap()).unwrap(),
        )
        .tls_built_in_root_certs(false)
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let r = with.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// HTTP/2 over TLS serves the API and invocations (many at once on one connection, and one
/// that outlasts the idle timeout), and an HTTP/2 connection is closed once it has had no
/// request open for `limits.idle_timeout_ms`, or none at all for `header_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_serves_and_idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (s, ca) = tls_gateway(
        dir.path(),
        "[limits]\nidle_timeout_ms = 1000\nheader_timeout_ms = 2000\n",
    );
    let auth = s.basic_auth_header().unwrap();
    let (mut h2, mut ended) = h2_connect(&s.addr(), &ca.file).await;
    let base = s.url("");

    // The API, with its credentials checked.
    let (code, _) = h2_send(&mut h2, "GET", format!("{base}/system/functions"), None, "").await;
    assert_eq!(code, 401);
    let f = echo_function("echo2");
    let (code, text) = h2_send(
        &mut h2,
        "POST",
        format!("{base}/system/functions"),
        Some(&auth),
        &f.to_string(),
    )
    .await;
    assert_eq!(code, 202, "{text}");
    s.wait_available("echo2", 1).await;

    // Fifty invocations at once on the one connection.
    let calls = (0..50).map(|i| {
        let mut sender = h2.clone();
        let uri = format!("{base}/function/echo2");
        async move { h2_send(&mut sender, "POST", uri, None, &format!("call {i}")).await }
    });
    let answers = futures::future::join_all(calls).await;
    for (i, (code, body)) in answers.into_iter().enumerate() {
        assert_eq!((code, body.as_str()), (200, format!("call {i}").as_str()));
    }

    // A request open longer than the idle timeout keeps its connection.
    let slow = json!({"service": "slow2", "image": "local/echo",
        "envProcess": "sh -c 'sleep 2.5; cat'"});
    let (code, text) = h2_send(
        &mut h2,
        "POST",
        format!("{base}/system/functions"),
        Some(&auth),
        &slow.to_string(),
    )
    .await;
    assert_eq!(code, 202, "{text}");
    s.wait_available("slow2", 1).await;
    let (code, body) = h2_send(
        &mut h2,
        "POST",
        format!("{base}/function/slow2"),
        None,
        "late",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "late"));

    // Then idle: told to go away after a second.
    assert!(
        closed_within(&mut ended, Duration::from_secs(5)).await,
        "an idle HTTP/2 connection stayed open"
    );

    // One that never sends a request: closed after the header timeout.
    let (_quiet, mut ended) = h2_connect(&s.addr(), &ca.file).await;
    let opened = std::time::Instant::now();
    assert!(
        closed_within(&mut ended, Duration::from_secs(6)).await,
        "an HTTP/2 connection without a request stayed open"
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "closed before its header timeout: {:?}",
        opened.elapsed()
    );
}

/// A plain listener speaks HTTP/1.1 only: an HTTP/2 client with prior knowledge gets no
/// answer, an HTTP/1.1 client on the same server does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_listener_does_not_serve_http2() {
    let s = Server::start();
    let tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(s.url("/healthz"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        h2.ready().await?;
        h2.send_request(req).await
    })
    .await
    .expect("the server neither answered nor closed");
    assert!(answered.is_err(), "served HTTP/2 in clear: {answered:?}");
    let r = reqwest::get(s.url("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
}
