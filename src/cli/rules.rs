//! `faastastic rules check`: lints Prometheus rule files for the autoscaler. An alert is meant
//! for faastastic when it carries `autoscale: "true"` or a `scale_action` label (or is the
//! OpenFaaS `APIHighInvocationRate`). Every rule's PromQL must parse; an alert meant for
//! faastastic must keep `function_name` in its output labels, have a valid action, a `for`
//! duration, and no label templated from the value (which makes every evaluation a new alert).

use std::collections::BTreeMap;
use std::path::Path;

use promql_parser::label::Labels;
use promql_parser::parser::value::ValueType;
use promql_parser::parser::{self, Expr, LabelModifier, VectorMatchCardinality};
use serde::Deserialize;

const LABEL: &str = "function_name";

/// A rule file's top level holds `groups` and nothing else (as promtool reads it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
struct Group {
    #[serde(default)]
    name: String,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    #[serde(default)]
    alert: Option<String>,
    #[serde(default)]
    record: Option<String>,
    #[serde(default)]
    expr: Option<serde_yaml::Value>,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// One problem, printed as `file:line: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Checks one file; an unreadable or unparsable file is one finding at line 1 (or the YAML
/// error's line).
pub fn check_file(path: &Path) -> Vec<Finding> {
    let file = path.display().to_string();
    let finding = |line: usize, message: String| Finding {
        file: file.clone(),
        line,
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![finding(1, format!("cannot read: {e}"))],
    };
    let parsed: RuleFile = match serde_yaml::from_str(&text) {
        Ok(p) => p,
        Err(e) => {
            let line = e.location().map(|l| l.line()).unwrap_or(1);
            return vec![finding(line, format!("not a rule file: {e}"))];
        }
    };
    if parsed.groups.is_empty() {
        return vec![finding(
            1,
            "not a rule file: no rule groups (a rule file is a top-level `groups:` list)".into(),
        )];
    }
    let mut findings = Vec::new();
    let mut cursor = 0; // line index to search from, so repeated names map in order
    let lines: Vec<&str> = text.lines().collect();
    for group in &parsed.groups {
        for rule in &group.rules {
            let (key, name) = match (&rule.alert, &rule.record) {
                (Some(a), _) => ("alert", a.as_str()),
                (None, Some(r)) => ("record", r.as_str()),
                (None, None) => ("alert", ""),
            };
            let line = find_line(&lines, &mut cursor, key, name);
            let mut report = |message: String| findings.push(finding(line, message));
            let what = if name.is_empty() {
                format!("a rule in group {:?}", group.name)
            } else {
                format!("{key} {name}")
            };
            let expr_text = match &rule.expr {
                Some(serde_yaml::Value::String(s)) => s.clone(),
                Some(serde_yaml::Value::Number(n)) => n.to_string(),
                _ => {
                    report(format!("{what}: expr is required"));
                    continue;
                }
            };
            let expr = match parser::parse(&expr_text) {
                Ok(e) => e,
                Err(e) => {
                    report(format!("{what}: PromQL syntax error: {}", e.trim()));
                    continue;
                }
            };
            let Some(alert) = &rule.alert else { continue };
            let labels = rule.labels.clone().unwrap_or_default();
            let for_faastastic = labels.get("autoscale").map(String::as_str) == Some("true")
                || labels.contains_key("scale_action")
                || alert == "APIHighInvocationRate";
            if !for_faastastic {
                continue;
            }
            if let Err(why) = keeps(&expr) {
                report(format!(
                    "alert {alert}: its output loses the {LABEL} label ({why}); the autoscaler cannot tell which function to scale"
                ));
            }
            match labels.get("scale_action").map(String::as_str) {
                None | Some("up" | "down" | "hold") => {}
                Some("to") => match labels.get("replicas") {
                    Some(r) if r.trim().parse::<u64>().is_ok() => {}
                    Some(r) => report(format!(
                        "alert {alert}: replicas label {r:?} is not a whole number"
                    )),
                    None => report(format!(
                        "alert {alert}: scale_action \"to\" needs a replicas label"
                    )),
                },
                Some(other) => report(format!(
                    "alert {alert}: scale_action {other:?} is not one of up, down, to, hold"
                )),
            }
            match &rule.for_ {
                None => report(format!(
                    "alert {alert}: no `for`: a single noisy evaluation would scale the function"
                )),
                Some(d) if !is_duration(d) => report(format!(
                    "alert {alert}: `for: {d}` is not a Prometheus duration such as 30s or 1m30s"
                )),
                Some(_) => {}
            }
            for (k, v) in &labels {
                if v.contains("{{") {
                    report(format!(
                        "alert {alert}: label {k} is templated ({v:?}); a label that changes makes every evaluation a new alert and defeats `for` — use an annotation"
                    ));
                }
            }
        }
    }
    findings
}

/// The 1-based line of `key: name` at or after `cursor`.
fn find_line(lines: &[&str], cursor: &mut usize, key: &str, name: &str) -> usize {
    for (i, line) in lines.iter().enumerate().skip(*cursor) {
        let t = line.trim_start().trim_start_matches("- ").trim_start();
        if let Some(rest) = t
            .strip_prefix(key)
            .and_then(|r| r.trim_start().strip_prefix(':'))
        {
            let value = rest.trim().trim_matches(['"', '\'']);
            if name.is_empty() || value == name {
                *cursor = i + 1;
                return i + 1;
            }
        }
    }
    1
}

/// Prometheus durations: one or more number+unit pairs (ms, s, m, h, d, w, y).
fn is_duration(text: &str) -> bool {
    let mut rest = text.trim();
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(**u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

fn contains(labels: &Labels) -> bool {
    labels.labels.iter().any(|l| l == LABEL)
}

/// Ok when the expression's output series still carry `function_name`; Err says where it goes.
fn keeps(expr: &Expr) -> Result<(), String> {
    match expr {
        Expr::VectorSelector(_) | Expr::MatrixSelector(_) => Ok(()),
        Expr::Paren(p) => keeps(&p.expr),
        Expr::Unary(u) => keeps(&u.expr),
        Expr::Subquery(s) => keeps(&s.expr),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {
            Err("a literal has no labels".to_string())
        }
        Expr::Aggregate(a) => {
            let op = a.op.to_string();
            match &a.modifier {
                Some(LabelModifier::Include(l)) if contains(l) => Ok(()),
                Some(LabelModifier::Include(_)) => {
                    Err(format!("{op} by (...) does not list {LABEL}"))
                }
                Some(LabelModifier::Exclude(l)) if contains(l) => {
                    Err(format!("{op} without ({LABEL}) removes it"))
                }
                Some(LabelModifier::Exclude(_)) => keeps(&a.expr),
                None if matches!(op.as_str(), "topk" | "bottomk" | "limitk" | "limit_ratio") => {
                    keeps(&a.expr)
                }
                None => Err(format!("{op} without by ({LABEL}) drops every label")),
            }
        }
        Expr::Binary(b) => {
            if b.op.is_set_operator() {
                return keeps(&b.lhs);
            }
            let lhs_vector = b.lhs.value_type() == ValueType::Vector;
            let rhs_vector = b.rhs.value_type() == ValueType::Vector;
            let right_side = matches!(
                b.modifier.as_ref().map(|m| &m.card),
                Some(VectorMatchCardinality::OneToMany(_))
            );
            if lhs_vector && !right_side {
                keeps(&b.lhs)
            } else if rhs_vector {
                keeps(&b.rhs)
            } else {
                Err("a comparison of scalars has no labels".to_string())
            }
        }
        Expr::Call(c) => {
            let name = c.func.name;
            let args = &c.args.args;
            match name {
                "vector" | "scalar" | "time" | "absent" | "absent_over_time" | "pi" => {
                    Err(format!("{name}() has no {LABEL}"))
                }
                "label_replace" | "label_join" => {
                    let target = args.get(1).map(|a| a.to_string());
                    if target.as_deref().map(|t| t.trim_matches(['"', '\''])) == Some(LABEL) {
                        Ok(())
                    } else {
                        args.first().map(|a| keeps(a)).unwrap_or(Ok(()))
                    }
                }
                "histogram_quantile" | "quantile_over_time" => {
                    args.get(1).map(|a| keeps(a)).unwrap_or(Ok(()))
                }
                _ => match args
                    .iter()
                    .find(|a| matches!(a.value_type(), ValueType::Vector | ValueType::Matrix))
                {
                    Some(a) => keeps(a),
                    None => Err(format!("{name}() of scalars has no labels")),
                },
            }
        }
        Expr::Extension(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(q: &str) -> bool {
        keeps(&parser::parse(q).unwrap()).is_ok()
    }

    #[test]
    fn tracks_function_name_through_expressions() {
        assert!(kept(
            r#"sum(rate(gateway_function_invocation_total{code="200"}[10s])) BY (function_name) > 5"#
        ));
        assert!(kept("rate(gateway_function_invocation_total[1m]) > 5"));
        assert!(kept("histogram_quantile(0.95, sum by (function_name, le) (rate(gateway_functions_seconds_bucket[1m]))) > 0.5"));
        assert!(kept(
            "sum without (code) (rate(gateway_function_invocation_total[1m])) > 1"
        ));
        assert!(kept("5 < sum by (function_name) (rate(x[1m]))"));
        assert!(kept("sum by (function_name) (rate(x[1m])) < 1 and on (function_name) gateway_service_count > 1"));
        assert!(!kept(
            "sum(rate(gateway_function_invocation_total[1m])) > 5"
        ));
        assert!(!kept(
            "sum by (code) (rate(gateway_function_invocation_total[1m])) > 5"
        ));
        assert!(!kept("sum without (function_name) (rate(x[1m]))"));
        assert!(!kept("vector(1)"));
        assert!(!kept("count(up) > 1"));
    }

    #[test]
    fn durations() {
        for good in ["5s", "1m", "1h30m", "500ms", "2d"] {
            assert!(is_duration(good), "{good}");
        }
        for bad in ["", "5", "1.5m", "soon", "5 s"] {
            assert!(!is_duration(bad), "{bad}");
        }
    }
}
