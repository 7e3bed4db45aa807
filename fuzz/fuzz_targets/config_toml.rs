//! The TOML configuration loader (`Config::parse`, what `Config::load` runs on the file's text).
//! Any text: errors are a list of messages, never a panic. A configuration that loads keeps the
//! promises the loader makes (one home datacenter, valid unique names, min not above max), and
//! what the server derives from it at start-up and on every decision (the policy for a
//! function, each query policy's strategy on any metric value) does not panic either.

#![no_main]

use faastastic::autoscale::labels::policy_for;
use faastastic::autoscale::strategy::{desired, Want};
use faastastic::config::Config;
use faastastic::model::{validate_dns_label, FunctionDeployment};
use faastastic::platform::ReplicaCounts;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file as UTF-8 first.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match Config::parse(text) {
        Ok(cfg) => cfg,
        Err(errors) => {
            assert!(!errors.is_empty(), "an error without a message");
            assert!(errors.iter().all(|e| !e.trim().is_empty()));
            return;
        }
    };
    // Parsing is a function of the text.
    assert!(Config::parse(text).is_ok());

    assert!(validate_dns_label("namespace", &cfg.default_namespace).is_ok());
    assert!(!cfg.datacenters.is_empty());
    assert_eq!(cfg.datacenters.iter().filter(|d| d.home).count(), 1);
    let mut names: Vec<&str> = cfg.datacenters.iter().map(|d| d.name.as_str()).collect();
    for n in &names {
        assert!(validate_dns_label("name", n).is_ok(), "{n:?}");
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names.len(),
        cfg.datacenters.len(),
        "a datacenter name twice"
    );
    assert!(cfg.datacenters.iter().any(|d| d.name == cfg.home()));
    let a = &cfg.autoscale;
    // Accepted settings always make a policy.
    let (base, _) = a.defaults.resolve().expect("accepted defaults resolve");
    assert!(base.min <= base.max);
    assert!(a.defaults.factor.is_none_or(|f| (1..=100).contains(&f)));
    assert!(base
        .target_per_replica
        .is_none_or(|t| t.is_finite() && t > 0.0));
    assert!(cfg.limits.max_replicas > 0);

    // The policy every function gets, with and without labels of its own.
    let plain = FunctionDeployment::default();
    let labelled = FunctionDeployment {
        labels: Some(
            [
                ("com.openfaas.scale.min", "2"),
                ("com.openfaas.scale.max", "7"),
                ("com.faastastic.scale.zero", "true"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ),
        ..Default::default()
    };
    let mut functions: Vec<String> = vec![
        "figlet.openfaas-fn".to_string(),
        "api-1.dev".to_string(),
        format!("f.{}", cfg.default_namespace),
    ];
    // Names that look like what the patterns are written for.
    for p in a
        .policies
        .iter()
        .map(|p| p.pattern.as_str().to_string())
        .take(4)
    {
        functions.push(p.replace(['*', '?', '[', ']'], "x"));
    }
    for q in a.queries.iter().take(4) {
        functions.push(q.pattern.as_str().replace(['*', '?', '[', ']'], "x"));
    }
    for function in &functions {
        for dep in [&plain, &labelled] {
            if let Ok((policy, _)) = policy_for(function, dep, a) {
                assert!(policy.min <= policy.max, "{function}: {policy:?}");
            }
        }
    }

    // Every query policy's strategy, on whatever a metric may return.
    for q in &a.queries {
        let _ = q.pattern.matches("figlet.openfaas-fn");
        for value in [
            0.0,
            0.5,
            1.0,
            3.0,
            1e9,
            1e300,
            -1.0,
            f64::NAN,
            f64::INFINITY,
        ] {
            for (desired_n, ready) in [(0, 0), (1, 0), (1, 1), (4, 2), (u64::MAX, 3)] {
                let replicas = ReplicaCounts {
                    desired: desired_n,
                    ready,
                };
                match desired(&q.strategy, replicas, value, base.max) {
                    Want::Replicas(_, why) | Want::Hold(why) => assert!(!why.is_empty()),
                }
            }
        }
    }
});
