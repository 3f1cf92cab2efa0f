//! The `fuzz` command as CI runs it: a finding (a panic, a broken oracle, a
//! worker that dies outright) exits 1, prints the input as hex and saves it
//! under --findings; a clean run exits 0; bad usage exits 2.

use std::path::Path;
use std::process::{Command, Output};

fn fuzz(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fuzz"))
        .args(args)
        .output()
        .expect("fuzz runs")
}

/// Runs the self-test target on a corpus holding just `input`.
fn finding(input: &[u8]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).expect("corpus dir");
    std::fs::write(corpus.join("seed"), input).expect("seed");
    let findings = dir.path().join("findings");
    let out = fuzz(&[
        "--target",
        "selftest",
        "--secs",
        "5",
        "--corpus",
        corpus.to_str().expect("utf-8 path"),
        "--findings",
        findings.to_str().expect("utf-8 path"),
    ]);
    (out, dir)
}

fn saved(dir: &Path, kind: &str) -> Vec<u8> {
    let entry = std::fs::read_dir(dir.join("findings"))
        .expect("findings written")
        .filter_map(Result::ok)
        .find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!("selftest-{kind}-")) && name.ends_with(".bin")
        })
        .expect("the finding is saved");
    std::fs::read(entry.path()).expect("readable")
}

#[test]
fn a_panic_is_a_finding_saved_and_printed_as_hex() {
    let input = b"panic\x00\xff";
    let (out, dir) = finding(input);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("self-test panic"), "{stderr}");
    assert!(
        stderr.contains("70616e696300ff"),
        "the input as hex: {stderr}"
    );
    assert_eq!(saved(dir.path(), "crash"), input);
}

#[test]
fn a_broken_oracle_is_a_finding() {
    let (out, dir) = finding(b"oracle");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(saved(dir.path(), "crash"), b"oracle");
}

#[test]
fn a_worker_that_dies_is_reported_by_the_supervisor() {
    let (out, dir) = finding(b"abort!");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the worker died"), "{stderr}");
    assert!(
        stderr.contains("61626f727421"),
        "the input as hex: {stderr}"
    );
    assert_eq!(saved(dir.path(), "died"), b"abort!");
}

#[test]
fn a_clean_run_exits_zero_and_bad_usage_two() {
    let dir = tempfile::tempdir().expect("temp dir");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/head");
    let out = fuzz(&[
        "--target",
        "head",
        "--secs",
        "1",
        "--corpus",
        corpus.to_str().expect("utf-8 path"),
        "--findings",
        dir.path().to_str().expect("utf-8 path"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing found"));
    assert_eq!(fuzz(&["--target", "nope"]).status.code(), Some(2));
}
