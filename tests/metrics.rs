//! `/metrics` as an operator's tools read it: names that follow the Prometheus
//! conventions (base units, `_total` on counters, a `model` label on LLM series),
//! and a dashboard and alert rules (deployments/monitoring/) that name only series
//! a running server exposes.

mod common;

use std::collections::BTreeMap;

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
