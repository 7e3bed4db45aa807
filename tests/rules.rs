//! The shipped rule files, Alertmanager examples and docker-compose stack, checked by the real
//! promtool, amtool and docker-compose: syntax, and the rule unit tests in rules/tests/.

mod common;

use std::process::Command;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rule_files_are_valid_and_their_unit_tests_pass() {
    common::require_program("promtool", "prometheus");
    run(
        "promtool",
        &[
            "check",
            "rules",
            "rules/openfaas.rules.yml",
            "rules/faastastic.rules.yml",
        ],
    );
    run(
        "promtool",
        &[
            "test",
            "rules",
            "rules/tests/openfaas_test.yml",
            "rules/tests/faastastic_test.yml",
            "rules/tests/faastastic_self_test.yml",
        ],
    );
}

#[test]
fn example_alertmanager_config_is_valid() {
    common::require_program("amtool", "prometheus-alertmanager");
    run("amtool", &["check-config", "rules/alertmanager.yml"]);
}

#[test]
fn compose_stack_and_its_configs_are_valid() {
    common::require_program("promtool", "prometheus");
    common::require_program("amtool", "prometheus-alertmanager");
    common::require_program("docker-compose", "docker-compose");
    run("promtool", &["check", "config", "deploy/prometheus.yml"]);
    run("amtool", &["check-config", "deploy/alertmanager.yml"]);
    run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
    );
    run(
        "docker-compose",
        &["-f", "deploy/ha/docker-compose.yml", "config", "-q"],
    );
    // The faastastic configs the stacks mount are ones this binary accepts.
    for file in ["deploy/faastastic.toml", "deploy/ha/faastastic.toml"] {
        let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let cfg = faastastic::config::Config::load(&cfg).unwrap_or_else(|e| panic!("{e}"));
        if file.contains("ha/") {
            assert!(cfg.store.is_some(), "the HA stack shares a database");
        }
    }
}
