//! TLS between datacenters, with certificates made by the test (rcgen) on loopback: a control
//! plane and an agent with mutual TLS (deploy, scale, invoke through the lane and the general
//! path), client certificates from another CA or expired refused and named on both sides, a
//! server certificate from an unknown CA refused, and the agent's certificate rotated under
//! load without a failed invocation.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{echo_function, free_port, poll, Agent, Load, Options, Server};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A private CA that issues certificates into `dir`.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    file: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let file = dir.join(format!("{name}.pem"));
        std::fs::write(&file, cert.pem()).unwrap();
        Ca { cert, key, file }
    }

    /// A certificate for `names` (DNS names, or IP addresses) as `stem.pem` and
    /// `stem-key.pem`; `expired`: valid in 2020 only.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let dns: Vec<String> = names
            .iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_err())
            .map(|n| n.to_string())
            .collect();
        let mut params = CertificateParams::new(dns).unwrap();
        for ip in names.iter().filter_map(|n| n.parse().ok()) {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.distinguished_name.push(DnType::CommonName, stem);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_file, key_file) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

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
        "[[datacenters]]\nname = \"home\"\nhome = true\n[[datacenters]]\nname = \"far\"\nplatform = \"remote\"\nurl = \"https://127.0.0.1:{port}\"\ntoken_file = {:?}\nca_file = {:?}\nserver_name = \"agent.test\"\n{client}",
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

/// An invocation with a chunked body (the lane hands those to the general path).
async fn invoke_chunked(s: &Server, name: &str) -> (u16, String) {
    let addr = s.addr();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /function/{name} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
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
    let server_cert = ca.issue(d, "agent", &["agent.test", "127.0.0.1"], false);
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
    let (code, text) = invoke_chunked(&s, "far-echo").await;
    assert_eq!(code, 200, "{text}");
    assert!(text.ends_with("hello"), "{text}");
    assert_eq!(s.scale("far-echo", 2).await, 202);
    s.wait_available("far-echo", 2).await;

    // The agent's certificate rotates under load: no invocation fails, new connections get
    // the new certificate.
    let before = presented(port, &ca.file).await;
    let load = Load::start(&s, "far-echo", 20, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let staged = ca.issue(d, "agent-next", &["agent.test", "127.0.0.1"], false);
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
    let cases = [
        (
            "another CA",
            Some(other.issue(d, "stranger", &["x.test"], false)),
            "unknownissuer",
        ),
        (
            "expired",
            Some(ca.issue(d, "old", &["old.test"], true)),
            "expired",
        ),
        ("none", None, "certificate"),
    ];
    for (what, cert, why) in cases {
        let log_before = std::fs::read_to_string(d.join("agent.log")).unwrap().len();
        let stranger = control_plane(d, port, &ca.file, cert.as_ref());
        let r = stranger.deploy(pinned("nope")).await;
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            code == 502
                && text.contains("far")
                && text.contains("the agent refused this control plane's TLS handshake"),
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

    // A control plane that does not trust the agent's CA refuses it, and says so.
    let wary = control_plane(d, port, &other.file, Some(&client));
    let r = wary.deploy(pinned("nope")).await;
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert!(
        code == 502
            && text.contains("far")
            && text.contains("invalid peer certificate")
            && text.contains("this control plane refused the agent's certificate"),
        "{code} {text}"
    );
}
