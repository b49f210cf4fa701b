//! The alert rules (charts/paynotify/files/alerts.yaml) and the Grafana dashboard
//! (charts/paynotify/files/dashboard.json), checked with the real `promtool` built by
//! scripts/helmtools.sh: the rules load, every alert fires and stays quiet in the unit tests
//! of tests/alerts/*.test.yaml, every alert has its runbook, and every dashboard query is
//! valid PromQL. That every metric they use is one the binaries export is checked against
//! real /metrics scrapes in tests/chart.rs.

#[path = "support/helmtools.rs"]
mod helmtools;
use helmtools::helmtool;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(helmtool("PAYNOTIFY_PROMTOOL"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const RULES: &str = "charts/paynotify/files/alerts.yaml";
const DASHBOARD: &str = "charts/paynotify/files/dashboard.json";

fn rules() -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(repo().join(RULES)).unwrap()).unwrap()
}

fn alerts() -> Vec<Value> {
    rules()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

fn unit_test_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/alerts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no tests/alerts/*.test.yaml");
    files
}

#[test]
fn promtool_checks_the_rules() {
    let (ok, out) = promtool(&["check", "rules", RULES]);
    assert!(ok, "promtool check rules failed:\n{out}");
    let n = alerts().len();
    assert!(
        out.contains(&format!("SUCCESS: {n} rules found")),
        "expected {n} rules:\n{out}"
    );
}

#[test]
fn every_alert_fires_and_stays_quiet_in_promtool_unit_tests() {
    let files = unit_test_files();
    let mut args = vec!["test".to_string(), "rules".to_string()];
    args.extend(files.iter().map(|f| f.to_string_lossy().into_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = promtool(&args);
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(!out.contains("FAILED"), "{out}");

    // Coverage: each alert is expected to fire at some evaluation, and expected to be quiet
    // (an empty exp_alerts) at another. promtool itself checks that nothing else fires.
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for file in &files {
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let rule_files = doc["rule_files"].as_array().unwrap();
        assert!(
            rule_files.iter().any(|f| f
                .as_str()
                .unwrap()
                .ends_with("charts/paynotify/files/alerts.yaml")),
            "{} must test the chart's own rule file",
            file.display()
        );
        for test in doc["tests"].as_array().unwrap() {
            for case in test["alert_rule_test"].as_array().unwrap() {
                let name = case["alertname"].as_str().unwrap().to_string();
                let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
                if expected == 0 {
                    quiet.insert(name);
                } else {
                    for alert in case["exp_alerts"].as_array().unwrap() {
                        assert!(
                            alert["exp_annotations"]["summary"].is_string(),
                            "{name}: expected alerts must pin their rendered annotations"
                        );
                    }
                    fires.insert(name);
                }
            }
        }
    }
    for alert in alerts() {
        let name = alert["alert"].as_str().unwrap();
        assert!(fires.contains(name), "{name} is never tested to fire");
        assert!(quiet.contains(name), "{name} is never tested to stay quiet");
    }
}

/// The tests catch a wrong rule: with one threshold changed, promtool's unit tests fail and
/// name the alert.
#[test]
fn the_unit_tests_fail_when_a_threshold_is_wrong() {
    let original = std::fs::read_to_string(repo().join(RULES)).unwrap();
    for (i, (from, to, alert)) in [
        (") < 0.95", ") < 0.4", "PaynotifyNotificationSuccessRateLow"),
        (
            "< time() + 30 * 86400",
            "< time() + 3 * 86400",
            "PaynotifyPlatformCertificateExpiringSoon",
        ),
        (
            "< time() + 7 * 86400\n",
            "< time() + 1 * 86400\n",
            "PaynotifyPlatformCertificateExpiryImminent",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mutated = original.replacen(from, to, 1);
        assert_ne!(
            original, mutated,
            "{from:?} is not in {RULES}: update this test"
        );
        let dir = std::env::temp_dir().join(format!(
            "paynotify-alerts-mutant-{}-{i}",
            std::process::id()
        ));
        let rules_dir = dir.join("charts/paynotify/files");
        let tests_dir = dir.join("tests/alerts");
        std::fs::create_dir_all(&rules_dir).unwrap();
        std::fs::create_dir_all(&tests_dir).unwrap();
        std::fs::write(rules_dir.join("alerts.yaml"), mutated).unwrap();
        for file in unit_test_files() {
            std::fs::copy(&file, tests_dir.join(file.file_name().unwrap())).unwrap();
        }
        let out = Command::new(helmtool("PAYNOTIFY_PROMTOOL"))
            .args(["test", "rules"])
            .args(
                std::fs::read_dir(&tests_dir)
                    .unwrap()
                    .map(|e| e.unwrap().path()),
            )
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!out.status.success(), "{from:?} -> {to:?} went unnoticed");
        assert!(
            text.contains(alert),
            "the failure must name {alert}:\n{text}"
        );
    }
}

/// The runbook section `### <alert>` of docs/operations.md: its text up to the next heading.
fn runbook_section<'a>(runbooks: &'a str, alert: &str) -> Option<&'a str> {
    let start = runbooks.find(&format!("\n### {alert}\n"))? + alert.len() + 6;
    let rest = &runbooks[start..];
    let end = rest.find("\n#").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook() {
    let runbooks = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let mut names = BTreeSet::new();
    for alert in alerts() {
        let name = alert["alert"].as_str().unwrap();
        assert!(name.starts_with("Paynotify"), "{name}");
        assert!(names.insert(name.to_string()), "{name} twice");
        let severity = alert["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                alert["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.trim().is_empty()),
                "{name}: no {key}"
            );
        }
        // GitHub's anchor of the heading `### <name>`; the chart prefixes the base URL.
        let anchor = name.to_lowercase();
        assert_eq!(
            alert["annotations"]["runbook_url"].as_str().unwrap(),
            format!("docs/operations.md#{anchor}"),
            "{name}: runbook_url"
        );
        let section = runbook_section(&runbooks, name).unwrap_or_else(|| {
            panic!("{name}: docs/operations.md has no runbook section `### {name}`")
        });
        // Each runbook says what to check and what to do.
        for part in ["**Check**", "**Do**"] {
            assert!(
                section.contains(part),
                "{name}: the runbook in docs/operations.md has no {part} part"
            );
        }
        assert!(
            section.len() > 300,
            "{name}: the runbook in docs/operations.md is too short to help"
        );
        // Every alert is scoped to paynotify's own scrape jobs.
        let expr = alert["expr"].as_str().unwrap();
        assert!(
            expr.contains("job=\"paynotify-ingress\"")
                || expr.contains("job=\"paynotify-controller\""),
            "{name}: not scoped to the paynotify jobs"
        );
    }
}

/// The dashboard's PromQL, made concrete: Grafana variables replaced by values.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                expr.to_string(),
            ));
        }
    }
    out
}

fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$namespace", ".*")
        .replace("$route", ".*")
        .replace("$provider", ".*")
}

#[test]
fn dashboard_is_a_complete_grafana_dashboard() {
    let text = std::fs::read_to_string(repo().join(DASHBOARD)).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    assert_eq!(dashboard["uid"], "paynotify-overview");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "route", "provider"]);

    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), &str> = BTreeMap::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{title} is wider than the dashboard");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title) {
                    panic!("{title} overlaps {other}");
                }
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            panel["description"].as_str().is_some_and(|d| d.len() > 20),
            "{title}: say what it shows and what to do"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(
                t["expr"]
                    .as_str()
                    .unwrap()
                    .contains("namespace=~\"$namespace\""),
                "{title}: every query follows the namespace variable"
            );
        }
    }
    // What an on-call engineer looks for first.
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Success rate (10m)",
        "Success rate by route and provider",
        "Answer time p50 / p95 / p99",
        "Rejections by reason",
        "Delivery attempts by target and outcome",
        "Queue depth (Queued)",
        "Oldest waiting event (Queued)",
        "Routing table generation: published vs served",
        "Reconciles and errors",
        "Platform certificates: days to expiry",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?}");
    }
}

/// Every dashboard query, with the variables filled in, is parsed by promtool as a recording
/// rule: a typo in PromQL fails here rather than as an empty panel at 3 a.m.
#[test]
fn dashboard_queries_are_valid_promql() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD)).unwrap()).unwrap();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() > 20, "only {} queries", exprs.len());
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({"record": format!("dashboard:query{i}"), "expr": concrete(e)}))
        .collect();
    let file = std::env::temp_dir().join(format!(
        "paynotify-dashboard-rules-{}.yaml",
        std::process::id()
    ));
    std::fs::write(
        &file,
        serde_yaml::to_string(
            &serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}),
        )
        .unwrap(),
    )
    .unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(ok, "a dashboard query is not valid PromQL:\n{out}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

/// The same check catches a broken query (so the test above can fail).
#[test]
fn promtool_refuses_broken_promql() {
    let file = std::env::temp_dir().join(format!(
        "paynotify-broken-rules-{}.yaml",
        std::process::id()
    ));
    std::fs::write(
        &file,
        "groups:\n- name: x\n  rules:\n  - record: x\n    expr: sum by (route (rate(paynotify_notifications_total[5m]))\n",
    )
    .unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(!ok, "{out}");
}
