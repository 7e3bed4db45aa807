//! Command-line tools that need no server: `policy simulate`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn simulate(series: &str, args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(common::BIN)
        .args(["policy", "simulate", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(series.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn simulate_prints_the_replica_timeline() {
    let series = "{\"t\":0,\"action\":\"firing\",\"key\":\"a\"}\n{\"t\":6,\"action\":\"firing\",\"key\":\"b\"}\n{\"t\":7,\"action\":\"resolved\",\"key\":\"b\"}\n";
    let (code, out, err) = simulate(
        series,
        &[
            "-l",
            "com.openfaas.scale.max=4",
            "-l",
            "com.openfaas.scale.factor=50",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let path: Vec<u64> = rows
        .iter()
        .filter(|r| r["outcome"] == "scale")
        .map(|r| r["to"].as_u64().unwrap())
        .collect();
    assert_eq!(path, vec![3, 4, 2, 1], "{out}");
    let (code, table, _) = simulate(series, &[]);
    assert_eq!(code, 0);
    assert!(table.starts_with("policy: "), "{table}");
    assert!(table.contains("firing: step up by 1"), "{table}");
}

#[test]
fn simulate_reports_bad_input() {
    let (code, _, err) = simulate("{\"t\":0,\"action\":\"sideways\"}\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("line 1"), "{err}");
    let (code, _, err) = simulate("", &["-l", "com.openfaas.scale.factor=500"]);
    assert_eq!(code, 2);
    assert!(err.contains("com.openfaas.scale.factor"), "{err}");
}

/// The seed's path: the same demo scaled by real Prometheus and Alertmanager with the shipped
/// rule and route, one alert-sized decision for lon.
#[test]
fn demo_through_prometheus_and_alertmanager() {
    common::require_program("prometheus", "prometheus");
    common::require_program("prometheus-alertmanager", "prometheus-alertmanager");
    let out = tempfile::tempdir().unwrap();
    let stdout = run_demo(&["--prometheus", "--max-load-secs", "60"], out.path());
    assert!(stdout.contains("demo passed"), "{stdout}");
    assert!(
        stdout.contains("lon    1 -> 4  scaled   firing at"),
        "one alert-sized decision: {stdout}"
    );
    let timeline: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("timeline.json")).unwrap())
            .unwrap();
    assert_eq!(
        timeline.last().unwrap()["replicas"],
        1,
        "back down at the end"
    );
}

#[test]
fn demo_scales_up_under_load_and_back_down() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run_demo(&["--max-load-secs", "40"], out.path());
    assert!(stdout.contains("Hello, world!"), "{stdout}");
    assert!(stdout.contains("demo passed"), "{stdout}");
    // Its server's data directory is gone once it ends; the timeline stays.
    let data = stdout
        .split("(data in ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the demo names its data directory");
    assert!(
        !std::path::Path::new(data).exists(),
        "{data} is left behind"
    );
    // With --out the timeline is elsewhere, so the temporary directory goes too.
    let tmp = std::path::Path::new(data).parent().unwrap();
    assert!(!tmp.exists(), "{} is left behind", tmp.display());
    for dc in ["stage", "lon", "syd"] {
        assert!(
            stdout.contains(&format!("invoked in {dc}: Hello, world!")),
            "{stdout}"
        );
    }
    let timeline: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("timeline.json")).unwrap())
            .unwrap();
    assert_eq!(timeline[0]["replicas"], 1);
    assert!(timeline.iter().any(|p| p["ready"] == 4), "{timeline:?}");
    assert!(
        timeline
            .iter()
            .all(|p| p["stage_ready"] == 1 && p["syd_ready"] == 1),
        "only the loaded datacenter scales: {timeline:?}"
    );
    assert_eq!(
        timeline.last().unwrap()["replicas"],
        1,
        "back down at the end"
    );
    let csv = std::fs::read_to_string(out.path().join("timeline.csv")).unwrap();
    assert!(csv.starts_with("t_secs,phase,replicas"));
    let svg = std::fs::read_to_string(out.path().join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Every decision is marked: the scale-up from 1 and the one that reaches 4 (one decision
    // when the first evaluation already sees the whole load, two on a busy machine).
    let markers: Vec<&str> = svg
        .split("<text")
        .filter_map(|t| t.split('>').nth(1)?.split('<').next())
        .filter(|t| t.starts_with("lon "))
        .collect();
    assert!(
        markers.iter().any(|m| m.starts_with("lon 1 → ")),
        "the scale-up from 1 is marked: {markers:?}"
    );
    assert!(
        markers.iter().any(|m| m.ends_with("→ 4")),
        "the decision reaching 4 is marked: {markers:?}"
    );
    // The decisions printed carry the query's reasoning.
    assert!(stdout.contains("at target 10 per replica"), "{stdout}");
}

fn rules_check(files: &[&str]) -> (i32, String) {
    let out = Command::new(common::BIN)
        .args(["rules", "check"])
        .args(files)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn rules_check_passes_the_shipped_rules() {
    let (code, out) = rules_check(&["rules/openfaas.rules.yml", "rules/faastastic.rules.yml"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rules/faastastic.rules.yml: ok"), "{out}");
}

#[test]
fn rules_check_names_file_and_line_of_each_problem() {
    let (code, out) = rules_check(&["tests/fixtures/rules/dropped_label.yml"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("tests/fixtures/rules/dropped_label.yml:4: alert TotalTooHigh: its output loses the function_name label"),
        "{out}"
    );
    let (code, out) = rules_check(&["tests/fixtures/rules/bad_labels.yml"]);
    assert_eq!(code, 1);
    for expected in [
        "bad_labels.yml:9: alert Sideways: scale_action \"sideways\"",
        "bad_labels.yml:9: alert Sideways: no `for`",
        "bad_labels.yml:9: alert Sideways: label value is templated",
    ] {
        assert!(out.contains(expected), "{expected} missing in:\n{out}");
    }
    assert!(!out.contains("alert Fine"), "{out}");
    let (code, out) = rules_check(&["tests/fixtures/rules/syntax_error.yml"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("syntax_error.yml:6: alert Broken: PromQL syntax error"),
        "{out}"
    );
    assert_eq!(
        out.lines().count(),
        1,
        "the valid recording rule is fine: {out}"
    );
}

/// Files that are not rule files (a misspelled `groups:`, a compose file) are findings, as
/// promtool refuses them, never an `ok`.
#[test]
fn rules_check_refuses_files_that_are_not_rule_files() {
    for file in [
        "tests/fixtures/rules/misspelled_groups.yml",
        "docker-compose.yml",
    ] {
        let (code, out) = rules_check(&[file]);
        assert_eq!(code, 1, "{file}: {out}");
        assert!(out.contains(&format!("{file}:")), "{out}");
        assert!(out.contains("not a rule file"), "{out}");
        assert!(!out.contains(": ok"), "{out}");
    }
}

/// Runs `faastastic demo ARGS --out DIR`, which must succeed, and returns its output.
fn run_demo(args: &[&str], out: &std::path::Path) -> String {
    let run = Command::new(common::BIN)
        .arg("demo")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}
