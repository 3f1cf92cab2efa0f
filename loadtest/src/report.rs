//! Human-readable tables of a run's summary, for stdout. The JSON summary is the
//! record (written to `--out`, or printed instead of the table with `--json`); the
//! table is rendered from it, so both always say the same thing.

use std::fmt::Write;

use serde_json::{Map, Value};

/// The table for any summary: `compare`'s (chatbox, baseline, ratio per metric)
/// or a single scenario's (every field, latencies in ms).
pub fn render(summary: &Value) -> String {
    if summary["scenario"] == "compare" {
        compare(summary)
    } else {
        single(summary)
    }
}

/// A latency object: the quantiles `scenarios::quantiles` writes.
fn is_quantiles(v: &Value) -> bool {
    v.get("p50").is_some() && v.get("p99").is_some()
}

/// A number as a person reads it: integers whole, fractions to a useful precision.
fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// `rtt_us` -> (`rtt`, 1000.0): microsecond fields are shown in ms.
fn unit_of(key: &str) -> (&str, &'static str, f64) {
    match key.strip_suffix("_us") {
        Some(base) => (base, " (ms)", 1000.0),
        None => (key, "", 1.0),
    }
}

/// A value shown in `div` units: microseconds as ms keep their fraction, so a
/// column reads alike (9.000, not 9).
fn scaled(v: f64, div: f64) -> String {
    if div == 1.0 || !v.is_finite() {
        num(v)
    } else if v / div >= 100.0 {
        format!("{:.1}", v / div)
    } else {
        format!("{:.3}", v / div)
    }
}

fn quantile_row(q: &Value, div: f64) -> String {
    ["p50", "p99", "p999", "max"]
        .iter()
        .filter_map(|k| Some(format!("{k} {}", scaled(q.get(*k)?.as_f64()?, div))))
        .chain(q.get("count").map(|n| format!("n {n}")))
        .collect::<Vec<_>>()
        .join("  ")
}

/// Every field of `obj` as `name value` rows, nested objects as dotted names.
fn rows(prefix: &str, obj: &Map<String, Value>, out: &mut Vec<(String, String)>) {
    for (k, v) in obj {
        let (base, unit, div) = unit_of(k);
        let name = format!("{prefix}{base}");
        match v {
            Value::Object(_) if is_quantiles(v) => {
                out.push((format!("{name}{unit}"), quantile_row(v, div)));
            }
            Value::Object(m) if m.is_empty() => out.push((name, "none".into())),
            Value::Object(m) => rows(&format!("{name}."), m, out),
            Value::Number(n) => out.push((name, n.as_f64().map_or(n.to_string(), num))),
            Value::String(s) => out.push((name, s.clone())),
            other => out.push((name, other.to_string())),
        }
    }
}

fn single(summary: &Value) -> String {
    let name = summary["scenario"].as_str().unwrap_or("run");
    let mut out = Vec::new();
    if let Some(m) = summary.as_object() {
        rows("", m, &mut out);
    }
    out.retain(|(k, _)| k != "scenario");
    let width = out.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max(6);
    let mut s = format!("{name}\n");
    for (k, v) in out {
        let _ = writeln!(s, "  {k:<width$}  {v}");
    }
    s
}

/// `chat`'s `/rtt_us/p50` -> `rtt p50 (ms)` and its divisor.
fn metric_label(pointer: &str) -> (String, f64) {
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        [field, q] => {
            let (base, unit, div) = unit_of(field);
            (format!("{base} {q}{unit}"), div)
        }
        _ => (parts.join("/"), 1.0),
    }
}

/// The pinning line: which CPUs each side ran on, or why not pinned.
pub fn pinning_line(p: &Value) -> String {
    let list = |v: &Value| crate::pin::format_list(&crate::pin::cpus_of(v));
    match p["pinned"].as_bool() {
        Some(true) => format!(
            "pinned: servers on CPUs {} (every thread checked), client on CPUs {}",
            list(&p["server_cpus"]),
            list(&p["client_cpus"])
        ),
        Some(false) => format!("not pinned: {}", p["reason"].as_str().unwrap_or("unknown")),
        None => "pinning: not recorded".into(),
    }
}

fn compare(summary: &Value) -> String {
    let scenario = summary["compared"].as_str().unwrap_or("?");
    let mut s = format!(
        "compare {scenario}: {} round(s), {} core(s) per server\n  {}\n",
        summary["rounds"],
        summary["server_cores"],
        pinning_line(&summary["pinning"])
    );
    let _ = writeln!(
        s,
        "  {:<24} {:>14} {:>14} {:>8}",
        "metric", "chatbox", "baseline", "ratio"
    );
    for r in summary["ratios"].as_array().into_iter().flatten() {
        let (label, div) = metric_label(r["metric"].as_str().unwrap_or("?"));
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let better = if r["higher_is_better"] == true {
            "  (higher is better)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "  {label:<24} {:>14} {:>14} {:>8.3}{better}",
            scaled(f("chatbox"), div),
            scaled(f("baseline"), div),
            f("ratio")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_scenario_prints_every_field_with_latencies_in_ms() {
        let t = render(
            &json!({"scenario": "chat", "acks": 120, "acks_per_sec": 40.5,
            "errors": 0, "rtt_us": {"p50": 1500, "p99": 2500, "p999": 9000, "max": 9100, "count": 120},
            "server": {"cpu_secs": 1.25}}),
        );
        assert!(t.starts_with("chat\n"), "{t}");
        let row = |name: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(name))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(row("acks_per_sec"), "acks_per_sec 40.500");
        assert_eq!(
            row("rtt (ms)"),
            "rtt (ms) p50 1.500 p99 2.500 p999 9.000 max 9.100 n 120"
        );
        assert_eq!(row("server.cpu_secs"), "server.cpu_secs 1.250");
        assert!(!t.contains('{'), "no JSON in the table: {t}");
    }

    #[test]
    fn compare_prints_each_metric_beside_both_servers_and_the_ratio() {
        let t = render(
            &json!({"scenario": "compare", "compared": "chat", "rounds": 1,
            "server_cores": 1,
            "pinning": {"pinned": true, "server_cpus": [0], "client_cpus": [1]},
            "ratios": [
              {"metric": "/acks_per_sec", "chatbox": 100.0, "baseline": 400.0, "ratio": 0.25, "higher_is_better": true},
              {"metric": "/rtt_us/p99", "chatbox": 20000.0, "baseline": 5000.0, "ratio": 4.0, "higher_is_better": false}
            ], "runs": []}),
        );
        assert!(
            t.contains("servers on CPUs 0 (every thread checked), client on CPUs 1"),
            "{t}"
        );
        assert!(t.contains("acks_per_sec"), "{t}");
        assert!(t.contains("0.250  (higher is better)"), "{t}");
        assert!(t.contains("rtt p99 (ms)"), "{t}");
        assert!(t.contains("20.000"), "{t}");
        let unpinned = render(
            &json!({"scenario": "compare", "pinning": {"pinned": false, "reason": "only 1 CPU"}}),
        );
        assert!(unpinned.contains("not pinned: only 1 CPU"), "{unpinned}");
    }
}
