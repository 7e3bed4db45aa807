//! The JSON bodies of `/system/functions` (FunctionDeployment, delete), `/system/scale-function`,
//! `/system/secrets` and `/system/namespace`, read with the handlers' `parse_json` and checked
//! with every validation the server applies before touching the store or a platform (the
//! deployment's own rules, the scaling labels and the policy built from them, the local
//! platform's rules, names and secret values). Nothing panics; an error names what is wrong;
//! and a deployment or namespace that parses is stored and read back unchanged (the store keeps
//! them as JSON) and echoed unchanged by the status answer.

#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::response::IntoResponse;
use base64::Engine as _;
use chrono::{TimeZone, Utc};
use faastastic::api::wire::{
    parse_json, status_json, DeleteFunctionRequest, ScaleServiceRequest, SecretRequest,
};
use faastastic::autoscale::labels::{check_labels, policy_for};
use faastastic::config::{AutoscaleConfig, Config};
use faastastic::fleet::FunctionView;
use faastastic::model::{
    split_qualified, validate_dns_label, validate_secret_name, Function, FunctionDeployment,
    FunctionId, Namespace, DEFAULT_NAMESPACE,
};
use faastastic::platform::local::LocalPlatform;
use faastastic::platform::{Platform, ReplicaCounts};
use faastastic::telemetry::Metrics;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    autoscale: AutoscaleConfig,
    local: LocalPlatform,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cfg = Config::default();
        // Validation never touches the run directory; it only has to exist.
        let run_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("scratch")
            .join(format!("local-{}", std::process::id()));
        let local = LocalPlatform::new(
            cfg.local.clone(),
            PathBuf::from("/bin/false"),
            run_dir,
            "stage",
            Arc::new(Metrics::new()),
        )
        .expect("local platform");
        Fixture {
            autoscale: cfg.autoscale,
            local,
        }
    })
}

/// An error from `parse_json` is a 400 with a message, and renders as a response.
fn rejected(e: faastastic::api::error::ApiError) {
    assert_eq!(e.status.as_u16(), 400);
    assert!(!e.message.trim().is_empty());
    let _ = e.into_response();
}

fn deployment(data: &[u8]) {
    let dep: FunctionDeployment = match parse_json(data) {
        Ok(d) => d,
        Err(e) => return rejected(e),
    };
    // The handler's reader and the store's reader agree.
    let plain: FunctionDeployment =
        serde_json::from_slice(data).expect("parse_json accepted what serde_json refuses");
    assert_eq!(plain, dep);

    let fx = fixture();
    let valid = dep.validate();
    if let Err(errors) = &valid {
        assert!(!errors.is_empty() && errors.iter().all(|e| !e.is_empty()));
    }
    let label_errors = check_labels(&dep);
    let name = dep.service.clone().unwrap_or_default();
    let namespace = dep
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let qualified = format!("{name}.{namespace}");
    match policy_for(&qualified, &dep, &fx.autoscale) {
        Ok((policy, _dry_run)) => {
            assert!(label_errors.is_empty());
            assert!(policy.min <= policy.max, "{policy:?}");
            serde_json::to_string(&policy).expect("policy serialises");
        }
        Err(errors) => assert!(!errors.is_empty()),
    }
    let min = dep.min_replicas();
    assert!(min >= 1);
    let platform_ok = fx.local.validate(&dep).is_ok();
    for replicas in [0, 1, 2, min] {
        let _ = fx.local.validate_scale(&dep, replicas);
    }
    if valid.is_ok() && label_errors.is_empty() {
        assert!(validate_dns_label("service", &name).is_ok());
        assert!(dep.image.as_deref().is_some_and(|i| !i.is_empty()));
    }

    // Stored as JSON and read back at start-up: a value that does not survive this would make
    // the store unreadable. Every parsed value must survive, valid or not.
    let stored = serde_json::to_string(&dep).expect("deployment serialises");
    let loaded: FunctionDeployment = serde_json::from_str(&stored)
        .unwrap_or_else(|e| panic!("stored deployment does not load: {e}: {stored}"));
    assert_eq!(
        loaded, dep,
        "store round trip changed the deployment: {stored}"
    );
    let again: FunctionDeployment =
        parse_json(stored.as_bytes()).unwrap_or_else(|e| panic!("{}: {stored}", e.message));
    assert_eq!(again, dep);

    // A deployment that passes validation is echoed by the status answer: labels,
    // annotations, limits and requests exactly as sent (Terraform compares them).
    if valid.is_ok() && label_errors.is_empty() && platform_ok {
        let view = FunctionView {
            function: Function {
                id: FunctionId::new(name.clone(), namespace.clone()),
                deployment: dep.clone(),
                replicas: [("stage".to_string(), min)].into(),
                created_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            }
            .into(),
            replicas: ReplicaCounts {
                desired: min,
                ready: 0,
            },
            datacenters: vec![(
                "stage".into(),
                ReplicaCounts {
                    desired: min,
                    ready: 0,
                },
            )],
        };
        let text = String::from_utf8(status_json(&view, &HashMap::new(), None, &[]))
            .expect("status is UTF-8");
        let echoed: FunctionDeployment =
            serde_json::from_str(&text).expect("status reads as a deployment");
        let fields: serde_json::Value = serde_json::from_str(&text).expect("status is JSON");
        assert_eq!(fields["name"].as_str(), Some(name.as_str()));
        assert_eq!(echoed.image, dep.image);
        assert_eq!(echoed.labels, dep.labels);
        assert_eq!(echoed.annotations, dep.annotations);
        assert_eq!(echoed.limits, dep.limits);
        assert_eq!(echoed.requests, dep.requests);
    }
}

/// `name` or `name.namespace`, as the scale and delete handlers read a function's name.
fn function_name(raw: &str, namespace: Option<&str>) {
    let (name, suffix) = split_qualified(raw);
    assert!(!name.contains('.') || suffix.is_some());
    if let Some(s) = suffix {
        assert_eq!(format!("{name}.{s}"), raw);
        assert!(!s.contains('.'));
    }
    let _ = validate_dns_label("name", name);
    if let Some(ns) = namespace.filter(|n| !n.is_empty()).or(suffix) {
        let _ = validate_dns_label("namespace", ns);
    }
}

fn scale(data: &[u8]) {
    let req: ScaleServiceRequest = match parse_json(data) {
        Ok(r) => r,
        Err(e) => return rejected(e),
    };
    function_name(
        req.service_name.as_deref().unwrap_or(""),
        req.namespace.as_deref(),
    );
    if let Some(dc) = req.datacenter.as_deref() {
        let _ = validate_dns_label("datacenter", dc);
    }
    if let Some(replicas) = req.replicas {
        let dep = FunctionDeployment::default();
        let _ = fixture().local.validate_scale(&dep, replicas);
    }
}

fn delete(data: &[u8]) {
    let req: DeleteFunctionRequest = match parse_json(data) {
        Ok(r) => r,
        Err(e) => return rejected(e),
    };
    function_name(
        req.function_name.as_deref().unwrap_or(""),
        req.namespace.as_deref(),
    );
}

/// What `Fleet::secret_record` checks: the name, and `rawValue` as base64 (it wins over `value`
/// when not empty).
fn secret(data: &[u8]) {
    let req: SecretRequest = match parse_json(data) {
        Ok(r) => r,
        Err(e) => return rejected(e),
    };
    let name = req.name.unwrap_or_default();
    if validate_secret_name(&name).is_ok() {
        assert!(!name.is_empty() && name.len() <= 253);
        assert!(
            !name.contains('/') && !name.contains(".."),
            "{name:?} is a path"
        );
        assert!(!name.starts_with(['.', '-']) && !name.ends_with(['.', '-']));
    }
    if let Some(ns) = req.namespace.as_deref().filter(|n| !n.is_empty()) {
        let _ = validate_dns_label("namespace", ns);
    }
    let value = match req.raw_value.as_deref().filter(|v| !v.is_empty()) {
        Some(raw) => match base64::engine::general_purpose::STANDARD.decode(raw) {
            Ok(bytes) => {
                let back = base64::engine::general_purpose::STANDARD.encode(&bytes);
                assert_eq!(
                    base64::engine::general_purpose::STANDARD
                        .decode(back)
                        .unwrap(),
                    bytes
                );
                bytes
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                Vec::new()
            }
        },
        None => req.value.unwrap_or_default().into_bytes(),
    };
    drop(value);
}

fn namespace(data: &[u8]) {
    let ns: Namespace = match parse_json(data) {
        Ok(n) => n,
        Err(e) => return rejected(e),
    };
    let _ = validate_dns_label("name", &ns.name);
    let text = serde_json::to_string(&ns).expect("namespace serialises");
    let back: Namespace = serde_json::from_str(&text).expect("stored namespace loads");
    assert_eq!(back, ns);
}

fuzz_target!(|data: &[u8]| {
    // The same body against every type, as a client may send any of them to any route.
    deployment(data);
    scale(data);
    delete(data);
    secret(data);
    namespace(data);
});
