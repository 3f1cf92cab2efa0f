//! End to end: `loadtest compare` against real release servers, pinned. Needs the
//! binaries, found through LOADTEST_CHATBOX_BIN and LOADTEST_BASELINE_BIN (e.g.
//! /var/tmp/chatbox-bin/chatbox and /var/tmp/chatbox-bin/baseline-server); skips,
//! saying so, without them or on a machine with a single CPU. Runs one short churn
//! round (about 2 s per server); asserts no timings.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn bins() -> Option<(PathBuf, PathBuf)> {
    let get = |k: &str| std::env::var_os(k).map(PathBuf::from);
    match (get("LOADTEST_CHATBOX_BIN"), get("LOADTEST_BASELINE_BIN")) {
        (Some(c), Some(b)) if std::thread::available_parallelism().map_or(0, |n| n.get()) >= 2 => {
            Some((c, b))
        }
        _ => {
            eprintln!(
                "SKIPPED: set LOADTEST_CHATBOX_BIN and LOADTEST_BASELINE_BIN to release \
                 binaries (and run on 2+ CPUs) to run compare end to end"
            );
            None
        }
    }
}

fn compare(chatbox: &std::path::Path, baseline: &std::path::Path, out: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "compare",
            "--scenario",
            "churn",
            "--users",
            "4",
            "--secs",
            "1",
        ])
        .args(["--rounds", "1", "--deadline-secs", "60", "--out", out])
        .arg("--chatbox")
        .arg(chatbox)
        .arg("--baseline")
        .arg(baseline)
        .output()
        .expect("loadtest runs")
}

fn tmp(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("loadtest-e2e-{}-{name}", std::process::id()))
        .display()
        .to_string()
}

/// Every thread of both servers was on the server's CPUs at start and at the
/// end, loadtest on the others; stdout is the table, the JSON in --out.
#[test]
fn compare_pins_both_servers_and_records_it() {
    let Some((chatbox, baseline)) = bins() else {
        return;
    };
    let out = tmp("pinned.json");
    let run = compare(&chatbox, &baseline, &out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.starts_with("compare churn"),
        "a table, not JSON: {stdout}"
    );
    assert!(stdout.contains("pinned: servers on CPUs 0"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(v["pinning"]["pinned"], true);
    assert_eq!(v["pinning"]["server_cpus"], serde_json::json!([0]));
    assert!(!v["pinning"]["client_cpus"].as_array().unwrap().is_empty());
    for r in v["runs"].as_array().unwrap() {
        let a = &r["affinity"];
        assert_eq!(a["cpus"], serde_json::json!([0]), "{r}");
        assert!(a["threads_checked_at_start"].as_u64().unwrap() >= 1, "{r}");
        assert!(a["threads_checked_at_end"].as_u64().unwrap() >= 1, "{r}");
    }
}

/// A server that escapes its CPU (here: a wrapper that re-pins itself with
/// `taskset` after loadtest pinned it) fails the run loudly.
#[test]
fn a_server_off_its_cpus_fails_the_run() {
    let Some((chatbox, baseline)) = bins() else {
        return;
    };
    let Ok(taskset) = which("taskset") else {
        eprintln!("SKIPPED: no taskset to make a server escape its CPUs");
        return;
    };
    // compare clears chatbox's environment, so the paths are written in.
    let wrapper = tmp("escaping-chatbox.sh");
    let script = format!(
        "#!/bin/sh\nexec {} -a -c 0-1 {} \"$@\"\n",
        taskset.display(),
        chatbox.display()
    );
    std::fs::write(&wrapper, script).unwrap();
    let chmod = Command::new("chmod")
        .args(["+x", &wrapper])
        .status()
        .unwrap();
    assert!(chmod.success());
    let out = tmp("escaped.json");
    let run = compare(std::path::Path::new(&wrapper), &baseline, &out);
    let _ = std::fs::remove_file(&wrapper);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success(),
        "a server off its CPUs must fail: {stderr}"
    );
    assert!(stderr.contains("pinning did not take"), "{stderr}");
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
