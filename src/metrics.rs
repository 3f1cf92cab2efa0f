//! Per-core counters, written only by their own core and summed when scraped.
//!
//! Each core owns one cache-line-aligned `CoreMetrics`. Only that core's thread
//! writes it, so an increment is a relaxed load and store (no locked instruction,
//! no contention); a scrape on any core reads all of them. Counts read during a
//! scrape may be a few increments behind, which Prometheus tolerates.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

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

/// Upper bounds (µs) of the latency histogram buckets, 1 ms to 60 s; the last
/// bucket is +Inf. Rendered in seconds (`le="0.001"`), the Prometheus base unit.
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
const SLOTS: usize = LATENCY_BOUNDS_US.len() + 1;

fn slot(us: u64) -> usize {
    LATENCY_BOUNDS_US
        .iter()
        .position(|&b| us <= b)
        .unwrap_or(LATENCY_BOUNDS_US.len())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A latency histogram with fixed buckets and one writer thread.
#[derive(Default)]
pub struct Histogram {
    buckets: [Counter; SLOTS],
    sum_us: Counter,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = micros(d);
        self.buckets[slot(us)].inc();
        self.sum_us.add(us);
    }
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].get()),
            sum_us: self.sum_us.get(),
        }
    }
}

/// A latency histogram any thread may write (an atomic add each): for work off
/// the cores, such as requests on the blocking pool.
#[derive(Default)]
pub struct SharedHistogram {
    buckets: [AtomicU64; SLOTS],
    sum_us: AtomicU64,
}

impl SharedHistogram {
    pub fn observe(&self, d: Duration) {
        let us = micros(d);
        self.buckets[slot(us)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// A histogram's counts at one moment (per bucket, not cumulative), summable
/// over cores.
#[derive(Default, Clone, Copy)]
pub struct Snapshot {
    buckets: [u64; SLOTS],
    sum_us: u64,
}

impl Snapshot {
    pub fn add(&mut self, other: &Snapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of `name`, in seconds;
    /// `labels` (`model="x"`, or empty) go on every line.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n;
            let le = LATENCY_BOUNDS_US
                .get(i)
                .map_or("+Inf".to_owned(), |&us| (us as f64 / 1e6).to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_us as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_sum{braces} {sum}\n{name}_count{braces} {cumulative}"
        );
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a series.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
    /// Files uploaded and stored, their bytes (as stored), uploads refused, and
    /// images whose location metadata was removed.
    pub uploads: Counter,
    pub upload_bytes: Counter,
    pub uploads_refused: Counter,
    pub upload_locations_removed: Counter,
    /// Time from a user message's arrival to its ack (committed).
    pub ack_latency: Histogram,
    refused: [Counter; Refusal::ALL.len()],
}

impl CoreMetrics {
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }
    pub fn refused_count(&self, why: Refusal) -> u64 {
        self.refused[why as usize].get()
    }
}

/// The LLM series of one model on one core.
#[derive(Default)]
pub struct LlmCounters {
    pub requests: Counter,
    pub retries: Counter,
    pub malformed_events: Counter,
    pub input_tokens: Counter,
    pub output_tokens: Counter,
    pub first_token: Histogram,
    pub answer: Histogram,
    errors: [Counter; LLM_ERROR_LABELS.len()],
}

impl LlmCounters {
    /// Counts a failed answer; `kind` indexes [`LLM_ERROR_LABELS`].
    pub fn error(&self, kind: usize) {
        if let Some(c) = self.errors.get(kind) {
            c.inc();
        }
    }
    pub fn error_count(&self, kind: usize) -> u64 {
        self.errors.get(kind).map_or(0, Counter::get)
    }
}

/// The LLM series of every configured model (label `model`, the id clients
/// send as `model_id`), one slot per core and model, each written by its core
/// only. Models are fixed at start, so the slots are too.
pub struct LlmMetrics {
    models: Vec<String>,
    /// `[core][model]`.
    cores: Box<[Box<[LlmCounters]>]>,
}

impl LlmMetrics {
    /// Slots for `models` (at least one slot) on `cores` cores.
    pub fn new(models: &[String], cores: usize) -> LlmMetrics {
        let slots = models.len().max(1);
        LlmMetrics {
            models: models.to_vec(),
            cores: (0..cores.max(1))
                .map(|_| (0..slots).map(|_| LlmCounters::default()).collect())
                .collect(),
        }
    }

    /// The counters of `model` on `core`. Every model a core asks for is a
    /// configured one; an unknown id (none exists) counts under the first model
    /// rather than panicking.
    pub fn of(&self, core: usize, model: &str) -> &LlmCounters {
        let i = self.models.iter().position(|m| m == model).unwrap_or(0);
        let slots = &self.cores[core.min(self.cores.len() - 1)];
        &slots[i.min(slots.len() - 1)]
    }

    /// One counter summed over cores and models (for tests and checks).
    pub fn total(&self, f: impl Fn(&LlmCounters) -> u64) -> u64 {
        self.cores.iter().flat_map(|c| c.iter()).map(f).sum()
    }

    /// Renders every LLM series, summed over cores, by model.
    pub fn render(&self, out: &mut String) {
        type Get = fn(&LlmCounters) -> u64;
        #[rustfmt::skip]
        let counters: [(&str, &str, Get); 5] = [
            ("chatbox_llm_requests_total", "Answers requested from a model.", |c| c.requests.get()),
            ("chatbox_llm_retries_total", "Model requests retried.", |c| c.retries.get()),
            ("chatbox_llm_malformed_events_total", "Malformed provider events skipped.", |c| c.malformed_events.get()),
            ("chatbox_llm_input_tokens_total", "Prompt tokens sent to models.", |c| c.input_tokens.get()),
            ("chatbox_llm_output_tokens_total", "Tokens received from models.", |c| c.output_tokens.get()),
        ];
        for (name, help, get) in counters {
            header(out, name, help, "counter");
            for (i, model) in self.models.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\"}} {}",
                    escape(model),
                    self.sum(i, get)
                );
            }
        }
        let name = "chatbox_llm_errors_total";
        header(out, name, "Failed answers, by model and kind.", "counter");
        for (i, model) in self.models.iter().enumerate() {
            let model = escape(model);
            for (kind, label) in LLM_ERROR_LABELS.iter().enumerate() {
                let n = self.sum(i, |c| c.error_count(kind));
                let _ = writeln!(out, "{name}{{model=\"{model}\",kind=\"{label}\"}} {n}");
            }
        }
        type Hist = fn(&LlmCounters) -> &Histogram;
        #[rustfmt::skip]
        let hists: [(&str, &str, Hist); 2] = [
            ("chatbox_llm_first_token_seconds", "Time to the first chunk of an answer.", |c| &c.first_token),
            ("chatbox_llm_answer_seconds", "Time to the end of an answer.", |c| &c.answer),
        ];
        for (name, help, get) in hists {
            header(out, name, help, "histogram");
            for (i, model) in self.models.iter().enumerate() {
                let mut snap = Snapshot::default();
                for c in self.cores.iter().filter_map(|c| c.get(i)) {
                    snap.add(&get(c).snapshot());
                }
                snap.write(out, name, &format!("model=\"{}\"", escape(model)));
            }
        }
    }

    /// Model `i`'s value of one counter, summed over cores.
    fn sum(&self, i: usize, f: impl Fn(&LlmCounters) -> u64) -> u64 {
        self.cores.iter().filter_map(|c| c.get(i)).map(f).sum()
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type Field = fn(&CoreMetrics) -> &Counter;

/// (name, help, type, per-core?, field)
#[rustfmt::skip]
const SERIES: &[(&str, &str, &str, bool, Field)] = &[
    ("chatbox_ws_connections_open", "Open WebSocket connections.", "gauge", true, |m| &m.ws_open),
    ("chatbox_tcp_accepted_total", "TCP connections accepted.", "counter", true, |m| &m.accepted),
    ("chatbox_ws_upgraded_total", "WebSocket upgrades completed.", "counter", true, |m| &m.ws_upgraded),
    ("chatbox_handovers_out_total", "Upgrades handed to the owning core.", "counter", true, |m| &m.handovers_out),
    ("chatbox_handovers_in_total", "Upgrades received from another core.", "counter", true, |m| &m.handovers_in),
    ("chatbox_http_requests_total", "Plain HTTP requests served.", "counter", false, |m| &m.http_requests),
    ("chatbox_ws_received_frames_total", "WebSocket data frames received.", "counter", true, |m| &m.frames_in),
    ("chatbox_ws_sent_frames_total", "WebSocket data frames sent.", "counter", true, |m| &m.frames_out),
    ("chatbox_ws_received_bytes_total", "Bytes received on WebSocket connections.", "counter", false, |m| &m.bytes_in),
    ("chatbox_ws_sent_bytes_total", "Bytes sent on WebSocket connections.", "counter", false, |m| &m.bytes_out),
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
    ("chatbox_uploads_total", "Files uploaded and stored.", "counter", false, |m| &m.uploads),
    ("chatbox_upload_bytes_total", "Bytes of uploaded files stored (after location metadata was removed).", "counter", false, |m| &m.upload_bytes),
    ("chatbox_uploads_refused_total", "Uploads refused (type, size, quota, rate limit, malformed, storage).", "counter", false, |m| &m.uploads_refused),
    ("chatbox_upload_locations_removed_total", "Uploaded images whose location metadata was removed.", "counter", false, |m| &m.upload_locations_removed),
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
    let name = "chatbox_ack_seconds";
    header(
        &mut out,
        name,
        "Time from a user message's arrival to its ack (stored).",
        "histogram",
    );
    let mut ack = Snapshot::default();
    for m in cores {
        ack.add(&m.ack_latency.snapshot());
    }
    ack.write(&mut out, name, "");
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

    #[test]
    fn histograms_render_in_seconds_and_llm_series_by_model() {
        let llm = LlmMetrics::new(&["fast".to_owned(), "care\"ful".to_owned()], 2);
        llm.of(0, "fast")
            .first_token
            .observe(Duration::from_micros(1_500));
        llm.of(1, "fast")
            .first_token
            .observe(Duration::from_secs(90));
        llm.of(1, "care\"ful").error(2);
        let mut text = String::new();
        llm.render(&mut text);
        let fast = "chatbox_llm_first_token_seconds_bucket{model=\"fast\",le=";
        assert!(text.contains(&format!("{fast}\"0.001\"}} 0\n")), "{text}");
        assert!(text.contains(&format!("{fast}\"0.0025\"}} 1\n")), "{text}");
        assert!(text.contains(&format!("{fast}\"60\"}} 1\n")), "{text}");
        assert!(text.contains(&format!("{fast}\"+Inf\"}} 2\n")), "{text}");
        assert!(text.contains("chatbox_llm_first_token_seconds_sum{model=\"fast\"} 90.0015\n"));
        assert!(text.contains("chatbox_llm_first_token_seconds_count{model=\"fast\"} 2\n"));
        let errors = "chatbox_llm_errors_total{model=\"care\\\"ful\",kind=\"rate_limited\"} 1\n";
        assert!(text.contains(errors), "{text}");
        assert_eq!(llm.total(|c| c.error_count(2)), 1);
    }
}
