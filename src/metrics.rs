//! Per-core counters, written only by their own core and summed when scraped.
//!
//! Each core owns one cache-line-aligned `CoreMetrics`. Only that core's thread
//! writes it, so an increment is a relaxed load and store (no locked instruction,
//! no contention); a scrape on any core reads all of them. Counts read during a
//! scrape may be a few increments behind, which Prometheus tolerates.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A counter or gauge with exactly one writer thread.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    /// Gauges only: replaces the value.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
    /// Gauges only.
    #[inline]
    pub fn dec(&self) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(1), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds (ms) of the latency histogram buckets; the last bucket is +Inf.
pub const LATENCY_BUCKETS_MS: [u64; 10] =
    [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000];

/// A latency histogram with fixed buckets and one writer thread.
#[derive(Default)]
pub struct Histogram {
    buckets: [Counter; LATENCY_BUCKETS_MS.len() + 1],
    sum_ms: Counter,
}

impl Histogram {
    pub fn observe(&self, ms: u64) {
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[i].inc();
        self.sum_ms.add(ms);
    }
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }
}

/// Why a connection or request was turned away (label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooManyConnections,
    Overloaded,
    ShuttingDown,
    HeadTimeout,
    HeadTooLarge,
    /// The client address holds `connections_per_address_max` connections.
    AddressConnections,
    /// The client address opens connections faster than
    /// `handshakes_per_address_per_second`.
    AddressRate,
}

impl Refusal {
    pub const ALL: [Refusal; 11] = [
        Refusal::BadRequest,
        Refusal::Unauthorized,
        Refusal::Forbidden,
        Refusal::NotFound,
        Refusal::TooManyConnections,
        Refusal::Overloaded,
        Refusal::ShuttingDown,
        Refusal::HeadTimeout,
        Refusal::HeadTooLarge,
        Refusal::AddressConnections,
        Refusal::AddressRate,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::Overloaded => "overloaded",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::HeadTimeout => "head_timeout",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::AddressConnections => "address_too_many_connections",
            Refusal::AddressRate => "address_rate_limited",
        }
    }
}

/// The kinds of failed answers, as labelled in `/metrics`. They live here, below
/// the LLM providers, so that metrics import nothing above them; `llm::ErrorKind`
/// indexes this list and a compile-time assertion there keeps the two in step.
pub const LLM_ERROR_LABELS: [&str; 8] = [
    "connect",
    "timeout",
    "rate_limited",
    "server_error",
    "client_error",
    "provider",
    "stream_ended",
    "too_large",
];

/// The counters of one core.
#[derive(Default)]
#[repr(align(64))]
pub struct CoreMetrics {
    /// Open WebSocket connections owned by this core (gauge).
    pub ws_open: Counter,
    /// TCP connections accepted by this core's listener.
    pub accepted: Counter,
    /// Upgrades handed to another core / received from another core.
    pub handovers_out: Counter,
    pub handovers_in: Counter,
    pub ws_upgraded: Counter,
    pub http_requests: Counter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub pings_sent: Counter,
    pub pong_timeouts: Counter,
    pub slow_consumers: Counter,
    /// Connections closed because their token expired (4001).
    pub tokens_expired: Counter,
    /// Connections an admin closed (4003): disconnects and deleted users.
    pub admin_disconnects: Counter,
    /// Cluster: users whose lease moved (fenced off, or the membership changed).
    pub users_let_go: Counter,
    pub panics: Counter,
    pub accept_errors: Counter,
    pub mesh_dropped: Counter,
    /// Sessions held in memory by this core (gauge).
    pub sessions_in_memory: Counter,
    pub sessions_created: Counter,
    pub messages_in: Counter,
    pub acks: Counter,
    pub duplicates: Counter,
    pub rate_limited: Counter,
    pub invalid_frames: Counter,
    pub answers_done: Counter,
    pub answers_cancelled: Counter,
    pub answer_chunks: Counter,
    pub store_errors: Counter,
    pub integrity_failures: Counter,
    pub takeovers: Counter,
    pub help_requests: Counter,
    pub llm_requests: Counter,
    pub llm_retries: Counter,
    pub llm_malformed_events: Counter,
    pub llm_tokens_in: Counter,
    pub llm_tokens_out: Counter,
    pub llm_first_token_ms: Histogram,
    pub llm_total_ms: Histogram,
    llm_errors: [Counter; LLM_ERROR_LABELS.len()],
    refused: [Counter; Refusal::ALL.len()],
}

impl CoreMetrics {
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }
    pub fn refused_count(&self, why: Refusal) -> u64 {
        self.refused[why as usize].get()
    }
    /// Counts a failed answer; `kind` indexes [`LLM_ERROR_LABELS`].
    pub fn llm_error(&self, kind: usize) {
        if let Some(c) = self.llm_errors.get(kind) {
            c.inc();
        }
    }
    pub fn llm_error_count(&self, kind: usize) -> u64 {
        self.llm_errors.get(kind).map_or(0, Counter::get)
    }
}

type Field = fn(&CoreMetrics) -> &Counter;
type HistField = fn(&CoreMetrics) -> &Histogram;

/// (name, help, type, per-core?, field)
#[rustfmt::skip]
const SERIES: &[(&str, &str, &str, bool, Field)] = &[
    ("chatbox_ws_connections_open", "Open WebSocket connections.", "gauge", true, |m| &m.ws_open),
    ("chatbox_tcp_accepted_total", "TCP connections accepted.", "counter", true, |m| &m.accepted),
    ("chatbox_ws_upgraded_total", "WebSocket upgrades completed.", "counter", true, |m| &m.ws_upgraded),
    ("chatbox_handovers_out_total", "Upgrades handed to the owning core.", "counter", true, |m| &m.handovers_out),
    ("chatbox_handovers_in_total", "Upgrades received from another core.", "counter", true, |m| &m.handovers_in),
    ("chatbox_http_requests_total", "Plain HTTP requests served.", "counter", false, |m| &m.http_requests),
    ("chatbox_ws_frames_in_total", "WebSocket data frames received.", "counter", true, |m| &m.frames_in),
    ("chatbox_ws_frames_out_total", "WebSocket data frames sent.", "counter", true, |m| &m.frames_out),
    ("chatbox_ws_bytes_in_total", "Bytes received on WebSocket connections.", "counter", false, |m| &m.bytes_in),
    ("chatbox_ws_bytes_out_total", "Bytes sent on WebSocket connections.", "counter", false, |m| &m.bytes_out),
    ("chatbox_ws_pings_sent_total", "Keep-alive pings sent.", "counter", false, |m| &m.pings_sent),
    ("chatbox_ws_pong_timeouts_total", "Connections closed for a missing pong.", "counter", false, |m| &m.pong_timeouts),
    ("chatbox_ws_slow_consumers_total", "Connections closed because they did not read.", "counter", false, |m| &m.slow_consumers),
    ("chatbox_ws_tokens_expired_total", "Connections closed because their token expired.", "counter", false, |m| &m.tokens_expired),
    ("chatbox_ws_admin_disconnects_total", "Connections closed by an admin (disconnect or user deletion).", "counter", false, |m| &m.admin_disconnects),
    ("chatbox_cluster_users_let_go_total", "Users this node stopped serving because their lease moved to another node (a fenced write or a membership change).", "counter", false, |m| &m.users_let_go),
    ("chatbox_panics_total", "Panics caught in connection tasks.", "counter", false, |m| &m.panics),
    ("chatbox_accept_errors_total", "Failed accept calls (EMFILE and others).", "counter", false, |m| &m.accept_errors),
    ("chatbox_mesh_dropped_total", "Cross-core messages refused because a queue was full.", "counter", false, |m| &m.mesh_dropped),
    ("chatbox_sessions_in_memory", "Chat sessions held in memory.", "gauge", true, |m| &m.sessions_in_memory),
    ("chatbox_sessions_created_total", "Chat sessions created.", "counter", false, |m| &m.sessions_created),
    ("chatbox_messages_total", "User messages accepted for storage.", "counter", false, |m| &m.messages_in),
    ("chatbox_acks_total", "User messages acknowledged after commit.", "counter", false, |m| &m.acks),
    ("chatbox_duplicates_total", "Resent messages answered with the original ack.", "counter", false, |m| &m.duplicates),
    ("chatbox_rate_limited_total", "Messages refused by the per-user rate limit.", "counter", false, |m| &m.rate_limited),
    ("chatbox_invalid_frames_total", "Client frames refused as invalid.", "counter", false, |m| &m.invalid_frames),
    ("chatbox_answers_total", "Answers completed.", "counter", false, |m| &m.answers_done),
    ("chatbox_answers_cancelled_total", "Answers cancelled.", "counter", false, |m| &m.answers_cancelled),
    ("chatbox_answer_chunks_total", "Answer chunks streamed.", "counter", false, |m| &m.answer_chunks),
    ("chatbox_store_errors_total", "Storage operations that failed.", "counter", false, |m| &m.store_errors),
        ("chatbox_integrity_failures_total", "Stored messages that failed authentication.", "counter", false, |m| &m.integrity_failures),
        ("chatbox_takeovers_total", "Admin joins of a session.", "counter", false, |m| &m.takeovers),
    ("chatbox_help_requests_total", "Help requests from users.", "counter", false, |m| &m.help_requests),
    ("chatbox_llm_requests_total", "Answers requested from a model.", "counter", false, |m| &m.llm_requests),
    ("chatbox_llm_retries_total", "Model requests retried.", "counter", false, |m| &m.llm_retries),
    ("chatbox_llm_malformed_events_total", "Malformed provider events skipped.", "counter", false, |m| &m.llm_malformed_events),
    ("chatbox_llm_tokens_in_total", "Prompt tokens sent to models.", "counter", false, |m| &m.llm_tokens_in),
    ("chatbox_llm_tokens_out_total", "Tokens received from models.", "counter", false, |m| &m.llm_tokens_out),
];

/// Renders every core's counters in the Prometheus text format (0.0.4).
pub fn render(cores: &[CoreMetrics]) -> String {
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP chatbox_build_info The running build.\n# TYPE chatbox_build_info gauge\n\
         chatbox_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    for &(name, help, kind, per_core, field) in SERIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        if per_core {
            for (i, m) in cores.iter().enumerate() {
                let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", field(m).get());
            }
        } else {
            let total: u64 = cores.iter().map(|m| field(m).get()).sum();
            let _ = writeln!(out, "{name} {total}");
        }
    }
    let hists: [(&str, &str, HistField); 2] = [
        (
            "chatbox_llm_first_token_ms",
            "Time to the first chunk of an answer.",
            |m| &m.llm_first_token_ms,
        ),
        (
            "chatbox_llm_total_ms",
            "Time to the end of an answer.",
            |m| &m.llm_total_ms,
        ),
    ];
    for (name, help, field) in hists {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS_MS
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_string()])
            .enumerate()
        {
            cumulative += cores.iter().map(|m| field(m).buckets[i].get()).sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum: u64 = cores.iter().map(|m| field(m).sum_ms.get()).sum();
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
    let name = "chatbox_llm_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Failed answers, by kind.\n# TYPE {name} counter"
    );
    for (kind, label) in LLM_ERROR_LABELS.iter().enumerate() {
        let total: u64 = cores.iter().map(|m| m.llm_error_count(kind)).sum();
        let _ = writeln!(out, "{name}{{kind=\"{label}\"}} {total}");
    }
    let name = "chatbox_refused_total";
    let _ = writeln!(
        out,
        "# HELP {name} Connections or requests refused, by reason.\n# TYPE {name} counter"
    );
    for why in Refusal::ALL {
        let total: u64 = cores.iter().map(|m| m.refused_count(why)).sum();
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {total}", why.label());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_cores_and_labels_reasons() {
        let cores: Vec<CoreMetrics> = (0..2).map(|_| CoreMetrics::default()).collect();
        cores[0].ws_open.inc();
        cores[1].ws_open.inc();
        cores[1].ws_open.inc();
        cores[1].ws_open.dec();
        cores[0].panics.inc();
        cores[1].panics.add(2);
        cores[1].refused(Refusal::TooManyConnections);
        let text = render(&cores);
        assert!(
            text.contains("chatbox_ws_connections_open{core=\"0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("chatbox_ws_connections_open{core=\"1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("chatbox_panics_total 3\n"), "{text}");
        let build = format!(
            "chatbox_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(text.contains("chatbox_refused_total{reason=\"too_many_connections\"} 1\n"));
        assert!(text.contains("chatbox_refused_total{reason=\"unauthorized\"} 0\n"));
    }
}
