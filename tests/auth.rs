//! Basic auth on every `/system/*` route (walked from `faastastic::api::route_table()`), none
//! on invocation, health and metrics; a generated password that is private to its owner and
//! reused across restarts; secret values that never leave the server.

mod common;

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use common::{concrete_path, echo_function, Options, Server};
use faastastic::api::{route_table, Access};
use reqwest::Method;
use serde_json::{json, Value};

/// The only paths served without credentials; a new open route must be added here on purpose.
const OPEN_PREFIXES: &[&str] = &["/function/", "/async-function/", "/healthz", "/metrics"];

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

    let table = route_table();
    let guarded: Vec<_> = table.iter().filter(|r| r.access != Access::Open).collect();
    assert!(guarded.len() >= 15, "{} guarded routes", guarded.len());
    assert!(guarded.iter().any(|r| r.access == Access::Alert));
    for route in &table {
        let open = OPEN_PREFIXES.iter().any(|p| route.path.starts_with(p));
        assert_eq!(
            route.access == Access::Open,
            open,
            "{} is {:?}",
            route.path,
            route.access
        );
        if route.path.starts_with("/system/") {
            assert_ne!(route.access, Access::Open, "{}", route.path);
        }
    }
    let mut checked = 0;
    for route in &guarded {
        let path = concrete_path(route.path, "fn1");
        for method in route.methods.iter().map(|m| m.method.clone()) {
            for auth in [
                None,
                Some(("admin", "wrong")),
                Some(("root", password.as_str())),
                Some(("admin", "")),
            ] {
                let mut req = s.http.request(method.clone(), s.url(&path)).body("{}");
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
            // A never-logged-in faas-cli sends an empty Bearer token; no alert token is
            // configured, so no Bearer token is accepted anywhere.
            for bearer in [
                "Bearer",
                "Bearer wrong-token",
                &format!("Bearer {password}"),
            ] {
                let r = s
                    .http
                    .request(method.clone(), s.url(&path))
                    .header("Authorization", bearer)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 401, "{method} {path} with {bearer:?}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 23, "only {checked} guarded methods");

    // With the right credentials: faas-cli login's check, then a deploy.
    let r = s
        .system(Method::GET, "/system/functions")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.deploy(echo_function("open")).await.status(), 202);
    s.wait_available("open", 1).await;

    // Every method of every open route answers without credentials.
    for route in table.iter().filter(|r| r.access == Access::Open) {
        let path = concrete_path(route.path, "open");
        for method in route.methods.iter().map(|m| m.method.clone()) {
            let r = s
                .http
                .request(method.clone(), s.url(&path))
                .body("x")
                .send()
                .await
                .unwrap();
            let want = if path.starts_with("/async-function/") {
                202
            } else {
                200
            };
            assert_eq!(r.status(), want, "{method} {path}");
        }
    }
    assert_eq!(s.invoke("open", "x").await, (200, "x".to_string()));

    // The password never shows up in what the server exposes.
    let metrics = s.metrics().await;
    assert!(!metrics.contains(&password));
    let list = s.system_text("/system/functions").await;
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

/// Sends a `/system` request that must answer `want`; keeps the answer's body.
async fn call(
    s: &Server,
    answers: &mut Vec<String>,
    method: Method,
    path: &str,
    body: Value,
    want: u16,
) {
    let r = s
        .system(method.clone(), path)
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(code, want, "{method} {path} {body}: {text}");
    answers.push(text);
}

/// The body of a `/system` GET that must succeed.
async fn get_text(s: &Server, path: &str) -> String {
    let r = s.system(Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

/// A secret's value goes in and reaches the function's file, and nothing else: not the
/// server's log (at debug level), not scale events, not error answers that name the secret,
/// not the secret list, function status, logs or metrics.
#[tokio::test]
async fn secret_values_never_leave_the_server() {
    const VALUE: &str = "zebra-8c1f-secret-value";
    const UPDATED: &str = "yak-42d9-updated-secret";
    // The command compares the file with the value's digest, so not even the deployment
    // carries the value.
    let reads = |value: &str, answer: &str| {
        use sha2::Digest;
        let digest: String = sha2::Sha256::digest(value.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "sh -c 'test \"$(sha256sum < $secret_mount_path/api-key | cut -c1-64)\" = {digest} && echo {answer}'"
        )
    };
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    let forbidden = [
        VALUE.to_string(),
        UPDATED.to_string(),
        b64(VALUE),
        b64(UPDATED),
    ];

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let s = Server::with(Options {
        auth: true,
        env: &[("RUST_LOG", "debug")],
        stderr_log: Some(&log),
        ..Default::default()
    });
    let mut answers: Vec<String> = Vec::new();
    call(
        &s,
        &mut answers,
        Method::POST,
        "/system/secrets",
        json!({"name": "api-key", "value": VALUE}),
        202,
    )
    .await;
    // The function proves it can read the value without ever printing it.
    let user = json!({"service": "user", "image": "x", "secrets": ["api-key"],
        "envProcess": reads(VALUE, "has-secret")});
    call(
        &s,
        &mut answers,
        Method::POST,
        "/system/functions",
        user.clone(),
        202,
    )
    .await;
    s.wait_available("user", 1).await;
    assert_eq!(
        s.invoke("user", "").await,
        (200, "has-secret\n".to_string())
    );

    // Errors that name the secret (or carry the value in the request).
    let cases = [
        (
            Method::POST,
            json!({"name": "api-key", "value": VALUE}),
            409,
        ),
        (Method::DELETE, json!({"name": "api-key"}), 409),
        (
            Method::PUT,
            json!({"name": "api-key-gone", "value": VALUE}),
            404,
        ),
        (
            Method::POST,
            json!({"name": "Api Key", "value": VALUE}),
            400,
        ),
        (
            Method::POST,
            json!({"name": "api-key-2", "rawValue": VALUE}),
            400,
        ),
        (
            Method::POST,
            json!({"name": "api-key", "value": VALUE, "namespace": "ghost"}),
            400,
        ),
        (
            Method::PUT,
            json!({"name": "api-key", "value": [VALUE]}),
            400,
        ),
    ];
    for (method, body, want) in cases {
        call(&s, &mut answers, method, "/system/secrets", body, want).await;
    }
    let r = s
        .system(Method::POST, "/system/secrets")
        .header("Content-Type", "application/json")
        .body(format!("{{\"name\":\"api-key\",\"value\":\"{VALUE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    answers.push(r.text().await.unwrap());
    call(
        &s,
        &mut answers,
        Method::POST,
        "/system/functions",
        json!({"service": "other", "image": "x", "envProcess": "cat", "secrets": ["api-key-missing"]}),
        400,
    )
    .await;

    // A new value, a rolling update that picks it up, a manual scale (a scale event).
    call(
        &s,
        &mut answers,
        Method::PUT,
        "/system/secrets",
        json!({"name": "api-key", "value": UPDATED}),
        202,
    )
    .await;
    let mut updated = user.clone();
    updated["envProcess"] = json!(reads(UPDATED, "has-new-secret"));
    call(
        &s,
        &mut answers,
        Method::PUT,
        "/system/functions",
        updated,
        202,
    )
    .await;
    let fresh = common::poll(std::time::Duration::from_secs(30), || async {
        s.invoke("user", "").await == (200, "has-new-secret\n".to_string())
    })
    .await;
    assert!(fresh, "the update did not start serving");
    call(
        &s,
        &mut answers,
        Method::POST,
        "/system/scale-function/user",
        json!({"serviceName": "user", "replicas": 2}),
        202,
    )
    .await;
    s.wait_available("user", 2).await;

    let secrets = get_text(&s, "/system/secrets").await;
    assert!(secrets.contains("\"api-key\""), "{secrets}");
    let events = get_text(&s, "/system/scale-events").await;
    assert!(
        events.contains("\"user\""),
        "a scale event was recorded: {events}"
    );
    let exposed = [
        ("secret list", secrets),
        ("scale events", events),
        ("function list", get_text(&s, "/system/functions").await),
        (
            "function status",
            get_text(&s, "/system/function/user").await,
        ),
        (
            "function logs",
            get_text(&s, "/system/logs?name=user&follow=false").await,
        ),
        ("metrics", s.metrics().await),
    ];
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("DEBUG") && log_text.contains("deployed"),
        "the log was captured at debug level"
    );
    assert!(
        answers.iter().any(|a| a.contains("api-key")),
        "errors name the secret"
    );
    for (what, text) in exposed
        .iter()
        .map(|(w, t)| (w.to_string(), t))
        .chain(answers.iter().map(|a| ("an error answer".to_string(), a)))
        .chain(std::iter::once(("the server log".to_string(), &log_text)))
    {
        for value in &forbidden {
            assert!(
                !text.contains(value.as_str()),
                "{what} shows a secret value:\n{text}"
            );
        }
    }
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
