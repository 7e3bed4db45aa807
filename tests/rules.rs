//! The shipped rule files and Alertmanager example, checked by the real promtool and amtool:
//! syntax, and the rule unit tests in rules/tests/.

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
        ],
    );
}

#[test]
fn example_alertmanager_config_is_valid() {
    common::require_program("amtool", "prometheus-alertmanager");
    run("amtool", &["check-config", "rules/alertmanager.yml"]);
}
