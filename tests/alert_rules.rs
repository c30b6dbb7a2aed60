//! The Prometheus alert rules in `deploy/alerts/`: `promtool check rules`
//! accepts `flowtel.rules.yaml`, and `promtool test rules` passes its unit
//! tests, `flowtel.rules.test.yaml`.
//!
//! Without promtool (Debian's `prometheus` package, installed by
//! `scripts/install-test-deps.sh`; or `$PROMTOOL_BIN`) the promtool part fails
//! under `CI` and is skipped otherwise. Two checks need no promtool and
//! always run: every alert has a unit test where it fires and one where it
//! stays quiet, and every metric and label the rules use is in
//! `docs/telemetry.md` (in its Prometheus form).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{find_tool, Tool};

const PROMTOOL: Tool = Tool {
    name: "promtool",
    env: "PROMTOOL_BIN",
    fallbacks: &["/usr/bin/promtool"],
};

const RULES: &str = "deploy/alerts/flowtel.rules.yaml";
const RULE_TESTS: &str = "deploy/alerts/flowtel.rules.test.yaml";

/// Labels the rules may use that are not flowtel attributes: the scrape
/// target's.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    let p = repo().join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Runs promtool with `args` from the repository root: whether it
/// succeeded, and everything it printed.
fn promtool(promtool: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", promtool.display()));
    let text = format!(
        "$ promtool {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The `- alert:` names of the rule file, in order.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Per alert name, how many `alert_rule_test` cases expect it to fire and
/// how many expect it quiet (`exp_alerts: []`).
fn cases(tests: &str) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_string());
        } else if let Some(exp) = line.strip_prefix("exp_alerts:") {
            let name = current.take().expect("exp_alerts follows an alertname");
            let entry = out.entry(name).or_default();
            if exp.trim() == "[]" {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
    }
    out
}

/// Every backticked name in `docs/telemetry.md`, in its Prometheus form
/// (anything but letters, digits and `_` turned into `_`).
fn documented_names(doc: &str) -> BTreeSet<String> {
    doc.split('`')
        .skip(1)
        .step_by(2)
        .map(|n| {
            n.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        })
        .collect()
}

/// The `flowtel_*` identifiers anywhere in `text` (names cut short by a
/// glob, like `flowtel_tcp_connections_*`, are left out).
fn flowtel_identifiers(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("flowtel_") && !w.ends_with('_'))
        .map(str::to_string)
        .collect()
}

/// The lines of every `expr: |` block.
fn expressions(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "expr: |" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut expr = String::new();
        while let Some(next) =
            lines.next_if(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        {
            expr.push_str(next.trim());
            expr.push('\n');
        }
        out.push(expr);
    }
    out
}

/// Label names an expression groups, joins or matches on: the lists after
/// `by`/`on`, and the names before `=`, `!=`, `=~`, `!~` inside `{}`.
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for keyword in ["by (", "on ("] {
        for part in expr.split(keyword).skip(1) {
            let list = part.split(')').next().unwrap_or_default();
            out.extend(list.split(',').map(|l| l.trim().to_string()));
        }
    }
    for part in expr.split('{').skip(1) {
        let inner = part.split('}').next().unwrap_or_default();
        for matcher in inner.split(',') {
            if let Some(name) = matcher.split(['=', '!']).next() {
                out.insert(name.trim().to_string());
            }
        }
    }
    out.retain(|l| !l.is_empty() && l != "__name__");
    out
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let alerts = alert_names(&read(RULES));
    let cases = cases(&read(RULE_TESTS));
    assert!(!alerts.is_empty(), "no alert in {RULES}");
    for alert in &alerts {
        let (firing, quiet) = cases.get(alert).copied().unwrap_or_default();
        println!("{alert}: {firing} firing case(s), {quiet} quiet case(s)");
        assert!(firing > 0, "{alert} has no test case where it fires");
        assert!(quiet > 0, "{alert} has no test case where it stays quiet");
    }
    for tested in cases.keys() {
        assert!(
            alerts.contains(tested),
            "{RULE_TESTS} tests {tested}, which {RULES} does not define"
        );
    }
}

#[test]
fn rules_use_only_documented_metrics_and_labels() {
    let documented = documented_names(&read("docs/telemetry.md"));
    let rules = read(RULES);
    // Metrics, and flowtel labels, in expressions and annotations alike. The
    // rules use counters, whose Prometheus names end in `_total`, and
    // histograms in seconds (`_seconds_bucket`).
    for name in flowtel_identifiers(&rules) {
        let base = ["_total", "_seconds_bucket"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            documented.contains(base),
            "{RULES} uses {name}, which docs/telemetry.md does not define"
        );
    }
    for expr in expressions(&rules) {
        for label in label_names(&expr) {
            assert!(
                TARGET_LABELS.contains(&label.as_str()) || documented.contains(&label),
                "{RULES} uses the label {label}, which docs/telemetry.md does not define:\n{expr}"
            );
        }
    }
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    let promtool_bin = match find_tool(&PROMTOOL) {
        Ok(p) => p,
        Err(why) => {
            common::skip("promtool_checks_and_tests_the_rules", &why);
            return;
        }
    };
    let (checked, check_out) = promtool(&promtool_bin, &["check", "rules", RULES]);
    println!("{check_out}");
    let (tested, test_out) = promtool(&promtool_bin, &["test", "rules", RULE_TESTS]);
    println!("{test_out}");
    let groups = read(RULE_TESTS)
        .lines()
        .filter(|l| l.trim_start().starts_with("- name:"))
        .count();
    let evaluations = read(RULE_TESTS).matches("exp_alerts:").count();
    println!("{groups} test groups, {evaluations} alert evaluations");
    assert!(
        checked && check_out.contains("SUCCESS"),
        "promtool check rules failed:\n{check_out}"
    );
    assert!(
        tested && test_out.contains("SUCCESS") && !test_out.contains("FAILED"),
        "promtool test rules failed:\n{test_out}"
    );
}
