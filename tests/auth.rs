//! Basic auth on every `/system/*` route, none on invocation, health and metrics; a generated
//! password that is private to its owner and reused across restarts.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{echo_function, Options, Server};
use reqwest::Method;
use serde_json::json;

/// Every registered `/system/*` route and method.
const SYSTEM_ROUTES: &[(&str, &str)] = &[
    ("GET", "/system/functions"),
    ("POST", "/system/functions"),
    ("PUT", "/system/functions"),
    ("DELETE", "/system/functions"),
    ("GET", "/system/function/fn1"),
    ("POST", "/system/scale-function/fn1"),
    ("GET", "/system/info"),
    ("GET", "/system/namespaces"),
    ("POST", "/system/namespace"),
    ("POST", "/system/namespace/"),
    ("GET", "/system/namespace/openfaas-fn"),
    ("PUT", "/system/namespace/openfaas-fn"),
    ("DELETE", "/system/namespace/openfaas-fn"),
    ("GET", "/system/secrets"),
    ("POST", "/system/secrets"),
    ("PUT", "/system/secrets"),
    ("DELETE", "/system/secrets"),
    ("GET", "/system/logs?name=fn1"),
    ("POST", "/system/alert"),
    ("GET", "/system/scale-events"),
    ("GET", "/system/autoscaling"),
    ("POST", "/system/autoscaling/pause"),
    ("POST", "/system/autoscaling/resume"),
];

#[tokio::test]
async fn every_system_route_needs_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::with(Options {
        auth: true,
        data_dir: Some(&data),
        ..Default::default()
    });
    let password = s.password.clone().expect("a password was generated");
    assert_eq!(password.len(), 32);
    let mode = std::fs::metadata(data.join("basic-auth-password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the password file is owner-only");
    assert_eq!(s.user, "admin");

    for (method, path) in SYSTEM_ROUTES {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        for auth in [
            None,
            Some(("admin", "wrong")),
            Some(("root", password.as_str())),
        ] {
            let mut req = s.http.request(method.clone(), s.url(path)).body("{}");
            if let Some((u, p)) = auth {
                req = req.basic_auth(u, Some(p));
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(
                r.headers()["www-authenticate"],
                "Basic realm=\"Restricted\""
            );
        }
        // A never-logged-in faas-cli sends an empty Bearer token.
        let r = s
            .http
            .request(method.clone(), s.url(path))
            .header("Authorization", "Bearer")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path} with empty Bearer");
    }

    // With the right credentials: faas-cli login's check, then a deploy.
    let r = s
        .system(Method::GET, "/system/functions")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.deploy(echo_function("open")).await.status(), 202);
    s.wait_available("open", 1).await;

    // Invocation, async, health and metrics stay open.
    assert_eq!(s.invoke("open", "x").await.0, 200);
    let r = s
        .http
        .post(s.url("/async-function/open"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for path in ["/healthz", "/metrics"] {
        let r = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // The password never shows up in what the server exposes.
    let metrics = s.metrics().await;
    assert!(!metrics.contains(&password));
    let list = s
        .system(Method::GET, "/system/functions")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!list.contains(&password));

    // Restart: the same password is reused.
    drop(s);
    let again = Server::with(Options {
        auth: true,
        data_dir: Some(&data),
        ..Default::default()
    });
    assert_eq!(again.password.as_deref(), Some(password.as_str()));
    let r = again
        .system(Method::GET, "/system/functions")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn configured_password_file_and_no_auth() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "from-file\n").unwrap();
    let config = format!(
        "[auth]\nuser = \"ops\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    let s = Server::with(Options {
        auth: true,
        config: Some(&config),
        ..Default::default()
    });
    let ok = s
        .http
        .get(s.url("/system/functions"))
        .basic_auth("ops", Some("from-file"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "the password is trimmed of its newline");
    assert!(
        !s.data_dir.join("basic-auth-password").exists(),
        "nothing generated"
    );

    // --no-auth ignores whatever Authorization header arrives.
    let open = Server::start();
    let r = open
        .http
        .get(open.url("/system/functions"))
        .header("Authorization", "Bearer")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = open
        .http
        .post(open.url("/system/secrets"))
        .header("Authorization", "Basic Zm9vOmJhcg==")
        .json(&json!({"name":"s","value":"v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[test]
fn bad_config_reports_every_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "listen = \"nowhere\"\nmystery = 1\n[proxy]\nupstream_timeout_secs = \"soon\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "listen:",
        "mystery: unknown key",
        "proxy.upstream_timeout_secs:",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}
