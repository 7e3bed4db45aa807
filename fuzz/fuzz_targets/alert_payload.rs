//! `POST /system/alert`: Alertmanager's webhook body, read as the handler reads it
//! (`api::alert::receive`). Any bytes may fail to parse, but never panic; every alert of a body
//! that parses is either ignored, invalid (with a message) or one signal, and every signal goes
//! through the policy engine, as the executor would feed it, without a panic.

#![no_main]

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use faastastic::autoscale::alertmanager::Webhook;
use faastastic::autoscale::policy::{decide, Action, Input, Outcome, Policy, State, StepCap};
use faastastic::model::{split_qualified, validate_dns_label};
use libfuzzer_sys::fuzz_target;

fn policies() -> [Policy; 3] {
    [
        // OpenFaaS's defaults: step mode.
        Policy::default(),
        // Proportional sizing with cooldowns, a window and a step cap.
        Policy {
            min: 2,
            max: 40,
            target_per_replica: Some(10.0),
            max_step_up: Some(StepCap::Percent(100)),
            up_cooldown: Duration::from_secs(30),
            down_cooldown: Duration::from_secs(60),
            stabilization_window: Duration::from_secs(120),
            ..Policy::default()
        },
        // Extremes a label can ask for.
        Policy {
            min: 0,
            max: u64::MAX,
            target_per_replica: Some(f64::MIN_POSITIVE),
            staleness_guard: true,
            ..Policy::default()
        },
    ]
}

fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000, 0).unwrap()
}

fuzz_target!(|data: &[u8]| {
    // The handler answers an empty body before parsing it.
    if data.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    let Ok(hook) = serde_json::from_slice::<Webhook>(data) else {
        return;
    };
    let receiver = hook.receiver.clone().unwrap_or_default();
    let alerts = hook.alerts.clone().unwrap_or_default();
    let policies = policies();
    for alert in &alerts {
        let function = alert.label("function_name").unwrap_or("").to_string();
        let signal = match alert.signal() {
            Ok(None) => continue,
            Err(e) => {
                assert!(!e.is_empty(), "an invalid alert says why");
                assert!(!function.is_empty(), "only autoscaling alerts are invalid");
                continue;
            }
            Ok(Some(signal)) => signal,
        };

        // The signal names what the labels name.
        assert!(!function.is_empty(), "a signal without function_name");
        let (name, suffix) = split_qualified(&function);
        assert_eq!(signal.name, name);
        match suffix {
            Some(ns) => assert_eq!(signal.namespace.as_deref(), Some(ns)),
            None => assert_eq!(signal.namespace.as_deref(), alert.label("namespace")),
        }
        assert_eq!(signal.datacenter.as_deref(), alert.label("datacenter"));
        assert_eq!(signal.alertname, alert.label("alertname").unwrap_or(""));
        assert_eq!(signal.dedupe_key.is_some(), alert.fingerprint.is_some());

        // Firing alerts ask for something; resolved ones only undo.
        let firing = alert.status.as_deref() == Some("firing");
        let asks = matches!(
            signal.action,
            Action::StepUp | Action::Sized { .. } | Action::StepDown | Action::Hold | Action::To(_)
        );
        assert_eq!(
            asks, firing,
            "{:?} for status {:?}",
            signal.action, alert.status
        );
        match signal.action {
            Action::Sized { value, target } => {
                assert!(value.is_finite() && value >= 0.0, "value {value}");
                if let Some(t) = target {
                    assert!(t.is_finite() && t > 0.0, "target {t}");
                }
            }
            Action::To(n) => {
                let label = alert.label("replicas").expect("to needs replicas");
                assert_eq!(label.trim().parse::<u64>().ok(), Some(n));
            }
            _ => {}
        }

        // What the handler checks and records before the executor sees the signal.
        let _ = validate_dns_label("function_name", &signal.name);
        let evidence = alert.evidence(&signal, &receiver, hook.group_key.as_ref());
        serde_json::to_vec(&evidence).expect("evidence serialises");

        // Into the engine, from several starting points; a retry of the same alert right after
        // is a duplicate once the first one scaled (and a cooldown keeps it remembered).
        for policy in &policies {
            let max = policy.max.max(policy.min);
            for current in [0, 1, 3, 39, 1000] {
                let input = Input::Signal {
                    action: signal.action,
                    dedupe_key: signal.dedupe_key.as_deref(),
                    observed_rate: None,
                };
                let (d, next) = decide(policy, current, &State::default(), input, now());
                assert_eq!(d.from, current);
                if d.outcome == Outcome::Scale {
                    assert!(d.to >= policy.min && d.to <= max, "{policy:?} {d:?}");
                    assert_ne!(d.to, current);
                } else {
                    assert_eq!(d.to, current);
                }
                assert!(!d.reason.to_string().is_empty(), "{d:?}");
                assert!(!d.reason.code().is_empty(), "{d:?}");
                serde_json::to_string(&next).expect("state serialises");
                let later = now() + chrono::Duration::seconds(1);
                let (again, _) = decide(policy, d.to, &next, input, later);
                let remembered = d.outcome == Outcome::Scale
                    && signal.dedupe_key.is_some()
                    && policy.up_cooldown.max(policy.down_cooldown) >= Duration::from_secs(1);
                if remembered {
                    assert_eq!(again.outcome, Outcome::Held, "retry not held: {again:?}");
                }
            }
        }
    }
});
