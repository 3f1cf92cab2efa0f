//! Progress of a long run on stderr, one line a second: elapsed time, what the
//! scenario has done so far (acks, chunks, cycles, ...) and its errors so far.
//! Scenarios count into two process-wide counters (a relaxed atomic add each, so
//! the hot loops pay nothing measurable); a ticker started per run reads them.
//! Shown only when stderr is a terminal or `--progress` is given, so CI logs and
//! pipes stay quiet unless asked.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static DONE: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Counts `n` units of the scenario's work (acks, chunks, cycles, connections).
pub fn done(n: u64) {
    DONE.fetch_add(n, Ordering::Relaxed);
}

/// Counts one error (the scenario keeps its own exact count for the summary).
pub fn error() {
    ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// Counts one error in the scenario's own `count` and in the progress line.
pub fn failed(count: &AtomicU64) {
    count.fetch_add(1, Ordering::Relaxed);
    error();
}

/// Whether progress lines are printed: `--progress`, or stderr is a terminal.
pub fn wanted(flag: bool) -> bool {
    flag || std::io::stderr().is_terminal()
}

/// What a scenario's progress counts.
pub fn unit(scenario: &str) -> &'static str {
    match scenario {
        "chat" => "acks",
        "churn" => "cycles",
        "stream" => "chunks",
        "takeover" => "delivered",
        _ => "connected",
    }
}

/// The line printed at `elapsed`.
pub fn line(label: &str, scenario: &str, elapsed: Duration, done: u64, errors: u64) -> String {
    format!(
        "  [{label}] {:>4}s: {done} {}, {errors} errors",
        elapsed.as_secs(),
        unit(scenario)
    )
}

/// A running ticker; stops printing when dropped.
pub struct Ticker(Option<tokio::task::JoinHandle<()>>);

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// Resets the counters and, when `on`, prints a progress line every second until
/// the returned ticker is dropped. `label` names the run (the scenario, or the
/// server under `compare`).
pub fn start(on: bool, label: String, scenario: String) -> Ticker {
    DONE.store(0, Ordering::Relaxed);
    ERRORS.store(0, Ordering::Relaxed);
    if !on {
        return Ticker(None);
    }
    let started = Instant::now();
    Ticker(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        loop {
            tick.tick().await;
            let (d, e) = (DONE.load(Ordering::Relaxed), ERRORS.load(Ordering::Relaxed));
            eprintln!("{}", line(&label, &scenario, started.elapsed(), d, e));
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_elapsed_work_and_errors() {
        let l = line(
            "chat chatbox",
            "chat",
            Duration::from_millis(3_400),
            1234,
            2,
        );
        assert_eq!(l, "  [chat chatbox]    3s: 1234 acks, 2 errors");
        assert!(line("x", "stream", Duration::ZERO, 0, 0).contains("0 chunks"));
    }

    #[test]
    fn the_flag_forces_progress_on() {
        assert!(wanted(true));
    }
}
