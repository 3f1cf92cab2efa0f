//! `/metrics` as an operator's tools read it: names that follow the Prometheus
//! conventions (base units, `_total` on counters, a `model` label on LLM series),
//! and a dashboard and alert rules (deployments/monitoring/) that name only series
//! a running server exposes.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

/// The metric families of a text exposition: name -> (type, sample lines).
fn families(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let mut out: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            out.insert(name.to_owned(), (kind.to_owned(), Vec::new()));
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| series.strip_suffix(s))
                .filter(|f| out.get(*f).is_some_and(|(k, _)| k == "histogram"))
                .unwrap_or(series);
            let entry = out
                .get_mut(family)
                .unwrap_or_else(|| panic!("sample without TYPE: {line}"));
            entry.1.push(line.to_owned());
        }
    }
    out
}

/// A running server's `/metrics` after one answered conversation, and the bus
/// series (cluster mode only) as the bus renders them.
async fn exposition() -> String {
    let server = start(config());
    let addr = server.local_addr();
    conversation(addr, "metrics-user", 1).await;
    let (status, _, body) = get(addr, "/chatbox/metrics").await;
    assert_eq!(status, 200);
    server.shutdown();
    stop(server).await;
    let mut bus = String::new();
    chatbox::runtime::bus::render_metrics(&Default::default(), true, 1, &mut bus);
    body + &bus
}

fn value(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line[series.len() + 1..].trim().parse().expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_follow_the_prometheus_conventions() {
    let text = exposition().await;
    let families = families(&text);
    let mut wrong = Vec::new();
    for (name, (kind, samples)) in &families {
        assert!(name.starts_with("chatbox_"), "{name}");
        if kind == "counter" && !name.ends_with("_total") {
            wrong.push(format!("{name}: a counter without _total"));
        }
        if ["_ms", "_millis", "_us", "_micros", "_secs", "_kb", "_mb"]
            .iter()
            .any(|u| name.ends_with(u) || name.contains(&format!("{u}_")))
        {
            wrong.push(format!("{name}: not in base units"));
        }
        if name.contains("bytes") && !(name.ends_with("_bytes") || name.ends_with("_bytes_total")) {
            wrong.push(format!("{name}: the unit is not the suffix"));
        }
        if kind == "histogram" && !(name.ends_with("_seconds") || name.ends_with("_bytes")) {
            wrong.push(format!("{name}: a histogram without a base unit"));
        }
        if name.starts_with("chatbox_llm_") {
            for s in samples.iter().filter(|s| !s.contains("model=\"")) {
                wrong.push(format!("{name}: no model label on {s}"));
            }
        }
        if kind == "histogram" {
            // Buckets in seconds: the first bound is a millisecond, not 50 "ms".
            let first = samples.iter().find(|s| s.contains("_bucket")).unwrap();
            let le = first
                .split("le=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            if le.parse::<f64>().map_or(true, |v| v > 0.01) {
                wrong.push(format!("{name}: first bucket {le} is not in seconds"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    for needed in [
        "chatbox_ack_seconds",
        "chatbox_llm_first_token_seconds",
        "chatbox_llm_answer_seconds",
        "chatbox_llm_errors_total",
        "chatbox_store_queue_depth",
        "chatbox_store_queue_capacity",
        "chatbox_bus_request_seconds",
        "chatbox_ws_received_bytes_total",
    ] {
        assert!(families.contains_key(needed), "{needed} missing");
    }
    // One message: one ack timed, one answer of the demo model timed.
    assert_eq!(value(&text, "chatbox_ack_seconds_count"), 1.0);
    assert!(value(&text, "chatbox_ack_seconds_sum") > 0.0);
    let first = "chatbox_llm_first_token_seconds_count{model=\"demo\"}";
    assert_eq!(value(&text, first), 1.0);
    assert_eq!(
        value(&text, "chatbox_llm_requests_total{model=\"demo\"}"),
        1.0
    );
    assert_eq!(value(&text, "chatbox_ready"), 1.0);
    assert_eq!(value(&text, "chatbox_store_queue_depth"), 0.0);
    assert_eq!(value(&text, "chatbox_store_queue_capacity"), 4096.0);
}

#[test]
fn every_histogram_has_cumulative_buckets_sum_and_count() {
    let mut text = String::new();
    chatbox::runtime::bus::render_metrics(&Default::default(), false, 1, &mut text);
    let bus = families(&text);
    let (kind, samples) = &bus["chatbox_bus_request_seconds"];
    assert_eq!(kind, "histogram");
    assert!(samples.iter().any(|s| s.contains("le=\"+Inf\"} 0")));
    assert!(samples
        .iter()
        .any(|s| s == "chatbox_bus_request_seconds_count 0"));
}

/// The alerts deployments/monitoring/alerts.yaml must define, no more, no less
/// (docs/OPERATIONS.md has a runbook entry for each).
const ALERTS: [&str; 11] = [
    "ChatboxDown",
    "ChatboxNotReady",
    "ChatboxHighAckLatency",
    "ChatboxLlmErrors",
    "ChatboxStorageErrors",
    "ChatboxStorageQueueHigh",
    "ChatboxMeshDrops",
    "ChatboxBusDown",
    "ChatboxSlowConsumers",
    "ChatboxDeadNotifications",
    "ChatboxPanics",
];

fn monitoring(file: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deployments/monitoring/");
    std::fs::read_to_string(format!("{path}{file}")).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Every `chatbox_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("chatbox_"))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` and variable query of a Grafana dashboard, wherever it sits.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

/// One alerting rule, as read by [`alert_rules`].
#[derive(Debug, Default)]
struct Rule {
    name: String,
    expr: String,
    keys: BTreeSet<String>,
}

/// The rules of a Prometheus rules file, by a structure check (no YAML crate is
/// in the tree, and promtool is not on PyPI): `groups:` of `- name:` and
/// `rules:`, each rule a `- alert:` with its keys indented below it, `expr` on
/// one line or as a `|` block.
fn alert_rules(text: &str) -> Vec<Rule> {
    assert!(!text.contains('\t'), "YAML has no tabs");
    assert!(text.lines().any(|l| l == "groups:"), "a top-level groups:");
    assert!(text.contains("  - name: ") && text.contains("    rules:"));
    let mut rules: Vec<Rule> = Vec::new();
    let mut in_expr_block = false;
    // The rule key (`labels`, `annotations`) the deeper keys belong to.
    let mut parent = String::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let indent = line.len() - line.trim_start().len();
        if let Some(name) = line.trim_start().strip_prefix("- alert: ") {
            assert_eq!(indent, 6, "rules sit under rules: at 6 spaces: {line}");
            rules.push(Rule {
                name: name.trim().to_owned(),
                ..Rule::default()
            });
            in_expr_block = false;
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue;
        };
        if in_expr_block && (indent > 8 || line.trim().is_empty()) {
            rule.expr.push_str(line.trim());
            rule.expr.push(' ');
            continue;
        }
        in_expr_block = false;
        if line.trim().is_empty() {
            continue;
        }
        assert!(indent >= 8, "a rule's keys are indented under it: {line}");
        let (key, value) = line.trim().split_once(':').unwrap_or((line.trim(), ""));
        if indent == 8 {
            parent = key.to_owned();
            rule.keys.insert(key.to_owned());
        } else {
            rule.keys.insert(format!("{parent}.{key}"));
        }
        if key == "expr" {
            let value = value.trim();
            if value == "|" || value == ">" {
                in_expr_block = true;
            } else {
                rule.expr = value.to_owned();
            }
        }
    }
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_metrics_that_exist() {
    let exposed = families(&exposition().await);
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let note = |used: &mut BTreeMap<String, Vec<String>>, expr: &str, place: &str| {
        for n in metric_names(expr) {
            // Histograms are queried through their series.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|f| exposed.get(*f).is_some_and(|(k, _)| k == "histogram"))
                .map_or(n.clone(), str::to_owned);
            used.entry(family).or_default().push(place.to_owned());
        }
    };

    let dashboard: serde_json::Value =
        serde_json::from_str(&monitoring("chatbox-dashboard.json")).expect("dashboard JSON");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
        "the data source is a variable"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    for q in &queries {
        note(&mut used, q, "dashboard");
    }
    let in_dashboard: BTreeSet<String> = used.keys().cloned().collect();
    for wanted in [
        "chatbox_ws_connections_open",
        "chatbox_messages_total",
        "chatbox_acks_total",
        "chatbox_ack_seconds",
        "chatbox_llm_first_token_seconds",
        "chatbox_llm_errors_total",
        "chatbox_store_queue_depth",
        "chatbox_store_errors_total",
        "chatbox_mesh_dropped_total",
        "chatbox_bus_errors_total",
        "chatbox_bus_up",
        "chatbox_cluster_members",
        "chatbox_ws_slow_consumers_total",
        "chatbox_notifications_dead_total",
        "chatbox_panics_total",
    ] {
        assert!(in_dashboard.contains(wanted), "no panel shows {wanted}");
    }

    let rules = alert_rules(&monitoring("alerts.yaml"));
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ALERTS, "exactly these alerts, once each");
    for r in &rules {
        for key in [
            "expr",
            "labels",
            "labels.severity",
            "annotations",
            "annotations.summary",
        ] {
            assert!(r.keys.contains(key), "{} has no {key}: {r:?}", r.name);
        }
        assert!(!r.expr.trim().is_empty(), "{}", r.name);
        note(&mut used, &r.expr, &r.name);
    }

    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exposed.contains_key(*name))
        .map(|(name, places)| format!("{name} (used by {places:?})"))
        .collect();
    assert!(missing.is_empty(), "not in /metrics: {missing:#?}");
}
