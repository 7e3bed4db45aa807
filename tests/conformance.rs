//! The conformance kit, run against faastastic itself: every required check passes. Run
//! against a server that leaves its API open, the kit fails and names the auth checks.

mod common;

use std::process::Command;

use common::{Options, Server, BIN};
use serde_json::Value;

/// Runs `faastastic conformance` against `s` and returns (success, report).
fn conformance(s: &Server, password_file: Option<&std::path::Path>) -> (bool, Value) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "conformance",
        "--json",
        "--ready-timeout-secs",
        "30",
        "--gateway",
    ])
    .arg(&s.base)
    .env_remove("OPENFAAS_PASSWORD")
    .env_remove("OPENFAAS_URL");
    if let Some(f) = password_file {
        cmd.arg("--password-file").arg(f);
    }
    if let Some(ca) = &s.ca_file {
        cmd.arg("--ca-file").arg(ca);
    }
    let out = cmd.output().expect("run the conformance kit");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "a JSON report ({e}); stdout: {}; stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

fn failed(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["pass"] == false)
        .map(|c| format!("{} {}: got {}", c["section"], c["name"], c["got"]))
        .collect()
}

#[test]
fn faastastic_passes_its_own_conformance_kit() {
    passes_its_own_conformance_kit(false);
}

/// The same over TLS with a private CA (`conformance --ca-file`).
#[test]
fn faastastic_over_tls_passes_its_own_conformance_kit() {
    passes_its_own_conformance_kit(true);
}

fn passes_its_own_conformance_kit(tls: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = common::tls::Ca::new(dir.path(), "ca");
    let cfg = match tls {
        true => {
            let (cert, key) = ca.issue(dir.path(), "gateway", &["127.0.0.1"], false);
            format!(
                "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            )
        }
        false => String::new(),
    };
    let s = Server::with(Options {
        auth: true,
        data_dir: Some(&data),
        config: Some(&cfg),
        ca_file: tls.then_some(ca.file.as_path()),
        ..Default::default()
    });
    assert_eq!(s.base.starts_with("https://"), tls, "{}", s.base);
    let (ok, report) = conformance(&s, Some(&data.join("basic-auth-password")));
    let failures = failed(&report);
    assert!(ok && failures.is_empty(), "failed checks: {failures:#?}");
    let checks = report["checks"].as_array().unwrap();
    assert!(checks.len() >= 50, "{} checks", checks.len());
    // The client sequences and the status-code matrix are all exercised.
    for section in [
        "7.1 deploy",
        "7.1 redeploy",
        "7.4 remove",
        "7.9 terraform",
        "1.4 matrix",
        "1.4 auth",
    ] {
        assert!(
            checks.iter().any(|c| c["section"] == section),
            "no check from {section}"
        );
    }
    // Nothing the kit created is left behind.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let functions: Vec<Value> = rt.block_on(s.get_json("/system/functions"));
    assert!(functions.is_empty(), "{functions:?}");
    let secrets: Vec<Value> = rt.block_on(s.get_json("/system/secrets"));
    assert!(secrets.is_empty(), "{secrets:?}");
}

#[test]
fn an_open_api_fails_the_auth_checks() {
    // Auth off: the kit is given a password, so it expects 401s and gets 200s.
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "some-password").unwrap();
    let (ok, report) = conformance(&s, Some(&password));
    assert!(!ok, "the run fails");
    let failures = failed(&report);
    assert_eq!(failures.len(), 3, "{failures:#?}");
    assert!(
        failures.iter().all(|f| f.starts_with("\"1.4 auth\"")),
        "{failures:#?}"
    );
}
