//! Every configuration key, declared once: name, type, default, bounds with their
//! unit, one line of documentation. The [`Config`] struct, the `CHATBOX_*`
//! overrides, the bound checks, `chatbox genconfig` and README.md's table all come
//! from the declarations at the bottom of this file.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cidr::Cidr;
use super::env::FromEnv;
use super::models::LlmSection;
use super::{ConfigError, IoDriver, LlmProvider, LogFormat, SttProvider};

/// The upper bound of a key that only has a lower one.
const NO_MAX: u64 = u64::MAX;

/// What is known about one key, for messages, `genconfig` and the README.
#[derive(Debug)]
pub struct Key {
    /// The field of [`Config`], and the key in the TOML file.
    pub field: &'static str,
    /// How the file spells it where that is not `field` (`llm.models`).
    pub shown: &'static str,
    /// The variable when it is not `CHATBOX_<FIELD>`; empty otherwise.
    env_name: &'static str,
    doc: &'static str,
    /// What the number counts (`ms`, `bytes`, ...); empty for non-numbers.
    pub unit: &'static str,
    /// Inclusive bounds; the upper one is [`NO_MAX`] when there is none.
    pub bounds: Option<(u64, u64)>,
    /// How the default follows other keys when this one is not set; empty when
    /// it does not.
    pub derived: &'static str,
    /// Declared `#[secret]`: `Debug` of a [`Config`] shows only whether it is set.
    pub secret: bool,
}

impl Key {
    /// The environment variable that overrides this key.
    pub fn env(&self) -> String {
        if self.env_name.is_empty() {
            format!("CHATBOX_{}", self.field.to_ascii_uppercase())
        } else {
            self.env_name.to_owned()
        }
    }

    /// The one line of documentation.
    pub fn doc(&self) -> &'static str {
        self.doc.trim()
    }

    /// `1..=3600 s`, `>= 10 ms`, or just the unit.
    pub fn bounds_text(&self) -> String {
        let text = match self.bounds {
            Some((lo, NO_MAX)) => format!(">= {lo} {}", self.unit),
            Some((lo, hi)) => format!("{lo}..={hi} {}", self.unit),
            None => self.unit.to_owned(),
        };
        text.trim().to_owned()
    }

    /// The message for a value outside the bounds, naming the variable.
    fn out_of_bounds(&self, value: u64) -> Option<String> {
        let (lo, hi) = self.bounds?;
        if (lo..=hi).contains(&value) {
            return None;
        }
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        let range = if hi == NO_MAX {
            format!("at least {lo}{unit}")
        } else {
            format!("between {lo} and {hi}{unit}")
        };
        Some(format!("{} must be {range}; it is {value}", self.env()))
    }
}

/// The declaration of `field` (every field has one: the struct and the table come
/// from the same macro input).
fn key(field: &str) -> &'static Key {
    KEYS.iter()
        .find(|k| k.field == field)
        .expect("every Config field is declared in KEYS")
}

/// A bounded number, widened for comparison with [`Key::bounds`].
trait Widen {
    fn widen(&self) -> u64;
}

impl Widen for u16 {
    fn widen(&self) -> u64 {
        u64::from(*self)
    }
}

impl Widen for u32 {
    fn widen(&self) -> u64 {
        u64::from(*self)
    }
}

impl Widen for u64 {
    fn widen(&self) -> u64 {
        *self
    }
}

impl Widen for usize {
    fn widen(&self) -> u64 {
        // usize is at most 64 bits on every target chatbox builds for.
        u64::try_from(*self).unwrap_or(u64::MAX)
    }
}

/// The first argument, or the fallback when the optional one was not given.
macro_rules! first {
    ($given:expr, $fallback:expr) => {
        $given
    };
    ($fallback:expr) => {
        $fallback
    };
}

/// `true` for a key declared `#[secret]` (and nothing else is accepted there).
macro_rules! secret_marker {
    (secret) => {
        true
    };
}

/// A secret field's value as `Debug` may show it.
macro_rules! redacted {
    (secret, $value:expr) => {
        &crate::secret::Redacted($value)
    };
}

/// Declares the keys: see the invocation below. A key holding a secret (or a
/// value that carries one, like a URL with a token or a password in it) is marked
/// `#[secret]` under its doc line.
macro_rules! declare_config {
    ($(
        #[doc = $doc:literal]
        $(#[$secret:ident])?
        $field:ident : $ty:ty = $default:expr
        $(, range($lo:expr, $hi:expr))?
        $(, unit $unit:literal)?
        $(, derived $derived:literal)?
        $(, file $shown:literal, env $env:literal)?
        ;
    )*) => {
        /// The whole configuration: one field per entry of [`KEYS`], with the
        /// defaults declared there. Its `Debug` redacts the `#[secret]` keys.
        #[derive(Clone, Deserialize, Serialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $(#[doc = $doc] pub $field: $ty,)*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $($field: $default,)* }
            }
        }

        impl std::fmt::Debug for Config {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut d = f.debug_struct("Config");
                $(d.field(
                    stringify!($field),
                    first!($(redacted!($secret, &self.$field),)? &self.$field),
                );)*
                d.finish()
            }
        }

        /// Every key in declaration order, which is the order of `chatbox genconfig`.
        pub static KEYS: &[Key] = &[$(
            Key {
                field: stringify!($field),
                shown: first!($($shown,)? stringify!($field)),
                env_name: first!($($env,)? ""),
                doc: $doc,
                unit: first!($($unit,)? ""),
                bounds: first!($(Some(($lo, $hi)),)? None),
                derived: first!($($derived,)? ""),
                secret: first!($(secret_marker!($secret),)? false),
            },
        )*];

        impl Config {
            /// Applies every override `lookup` finds; returns the keys it set.
            pub(super) fn apply_env_with(
                &mut self,
                lookup: &dyn Fn(&str) -> Option<String>,
            ) -> Result<Vec<&'static str>, ConfigError> {
                let mut set = Vec::new();
                $(
                    let var = key(stringify!($field)).env();
                    if let Some(value) = lookup(&var) {
                        self.$field = FromEnv::from_env(&value)
                            .map_err(|reason| ConfigError::Env { var, value, reason })?;
                        set.push(stringify!($field));
                    }
                )*
                Ok(set)
            }

            /// Every value outside its declared bounds, each message naming its variable.
            pub(super) fn bound_problems(&self) -> Vec<String> {
                let mut problems = Vec::new();
                $($(
                    let _declared: (u64, u64) = ($lo, $hi);
                    problems.extend(key(stringify!($field)).out_of_bounds(self.$field.widen()));
                )?)*
                problems
            }

            /// Each key with its value as TOML (`None` for an unset optional key).
            pub fn values(&self) -> Vec<(&'static Key, Option<toml::Value>)> {
                vec![$((key(stringify!($field)), toml::Value::try_from(&self.$field).ok()),)*]
            }
        }
    };
}

declare_config! {
    /// Address and port every core listens on (SO_REUSEPORT).
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080));
    /// Core threads; 0 means one per available CPU.
    cores: usize = 0, range(0, 1024), unit "threads";
    /// URL prefix of every endpoint, e.g. `/chatbox`; empty for none.
    path_prefix: String = "/chatbox".into();
    /// HMAC secret for HS256 JWTs, at least 32 bytes, required outside `--dev` (`openssl rand -hex 32`).
    #[secret]
    jwt_secret: Option<String> = None;
    /// When set, every JWT must carry this `iss`.
    jwt_issuer: Option<String> = None;
    /// When set, every JWT must carry this value in `aud`; unset, tokens carrying an `aud` are refused.
    jwt_audience: Option<String> = None;
    /// Clock skew tolerated on a JWT's `exp` and `nbf` when it is checked (a connection still closes when `exp` passes).
    jwt_leeway_secs: u64 = 5, range(0, 300), unit "s";
    /// 64 hex characters (32 bytes) for AES-256-GCM at rest, required outside `--dev` (`openssl rand -hex 32`).
    #[secret]
    encryption_key: Option<String> = None;
    /// Earlier encryption keys (comma list), still used to read what they encrypted (rotation).
    #[secret]
    encryption_previous_keys: Vec<String> = Vec::new();
    /// Origins allowed to open a WebSocket from a browser, and to call `/upload` and `/files` across origins (CORS; comma list); `*` allows all, empty none.
    allowed_origins: Vec<String> = Vec::new();
    /// Embedded store directory.
    data_dir: PathBuf = PathBuf::from("./data");
    /// Use MongoDB instead of the embedded store: `mongodb://host:port,...`, or `mongodb+srv://host` (its servers from DNS, as MongoDB Atlas hands out).
    #[secret]
    mongo_uri: Option<String> = None;
    /// The MongoDB database chatbox uses.
    mongo_database: String = "chatbox".into();
    /// Nodes that acknowledge a write before its ack: `majority` or a number.
    mongo_write_concern: String = "majority".into();
    /// How long writes are retried while MongoDB is unreachable before they fail (they wait in `store_queue_max`).
    mongo_write_retry_secs: u64 = 30, range(1, 3600), unit "s";
    /// How long start-up and `/readyz` wait to reach MongoDB.
    mongo_connect_timeout_ms: u64 = 5000, range(100, 120_000), unit "ms";
    /// The model's provider when `llm.models` is empty: `openai`, `anthropic` or `demo` (offline).
    llm_provider: LlmProvider = LlmProvider::Demo;
    /// The model's API base (https, or http on loopback) when `llm.models` is empty; the provider's by default.
    llm_base_url: Option<String> = None;
    /// The model's API key when `llm.models` is empty.
    #[secret]
    llm_api_key: Option<String> = None;
    /// The provider's model name when `llm.models` is empty; the provider's usual one by default.
    llm_model: Option<String> = None;
    /// WebSocket connections one user may hold at once (the next upgrade gets 429).
    max_connections_per_user: u32 = 10, range(1, 10_000), unit "connections";
    /// User messages per minute (token bucket whose burst is the same number).
    rate_limit_per_minute: u32 = 60, range(1, 1_000_000), unit "messages/min";
    /// Graceful shutdown takes at most this long, every step included (draining, closing connections, the storage flush, the notifier).
    shutdown_timeout_secs: u64 = 20, range(1, 3600), unit "s";
    /// At shutdown, how long answers still streaming may finish before they are cancelled and stored with their partial text; at most half of `shutdown_timeout_secs`.
    shutdown_grace_secs: u64 = 10, range(0, 3600), unit "s";
    /// Unauthenticated echo endpoint under the prefix, for WebSocket conformance runs; leave unset in production.
    echo_path: Option<String> = None;
    /// When set, `/metrics` needs `Authorization: Bearer <token>`.
    #[secret]
    metrics_token: Option<String> = None;
    /// Largest WebSocket frame payload accepted from a client (close 1009 above).
    ws_frame_bytes_max: usize = 64 * 1024, range(125, 64 * 1024 * 1024), unit "bytes",
        derived "65536, or ws_message_bytes_max when that is set lower";
    /// Largest reassembled WebSocket message accepted from a client.
    ws_message_bytes_max: usize = 64 * 1024, range(125, 64 * 1024 * 1024), unit "bytes",
        derived "65536, or ws_frame_bytes_max when that is set higher";
    /// Bytes queued for a client that does not read before it is closed (1013).
    ws_write_buffer_bytes_max: usize = 1024 * 1024, range(64 * 1024, NO_MAX), unit "bytes";
    /// Frames other tasks may queue for one connection before it counts as a slow reader.
    ws_outbox_frames_max: u32 = 4096, range(1, 1_000_000), unit "frames";
    /// Silence after which the server pings a client.
    ws_ping_interval_ms: u64 = 30_000, range(10, NO_MAX), unit "ms";
    /// Time a client has to answer a ping before it is closed (1008).
    ws_pong_timeout_ms: u64 = 10_000, range(10, NO_MAX), unit "ms";
    /// Time a client has to send a complete request head (408 after).
    http_head_timeout_ms: u64 = 10_000, range(10, NO_MAX), unit "ms",
        derived "10000, or http_request_timeout_ms when that is set lower";
    /// Time a plain HTTP request (head, body, response) may take in all.
    http_request_timeout_ms: u64 = 30_000, range(10, NO_MAX), unit "ms",
        derived "30000, or http_head_timeout_ms when that is set higher";
    /// Largest request head, request line and headers (431 above).
    http_head_bytes_max: usize = 16 * 1024, range(1024, 1024 * 1024), unit "bytes";
    /// Largest request body on plain HTTP endpoints.
    http_body_bytes_max: usize = 1024 * 1024, unit "bytes";
    /// Open connections one core holds before it refuses more with 503.
    connections_per_core_max: usize = 100_000, range(1, NO_MAX), unit "connections";
    /// Connections one client address (IPv4, or IPv6 /64) may hold at once, WebSockets and requests still in their handshake alike (429 beyond).
    connections_per_address_max: u32 = 4096, range(1, 1_000_000), unit "connections";
    /// New connections one client address may open per second, each carrying one request or upgrade (token bucket, burst the same; 429 beyond).
    handshakes_per_address_per_second: u32 = 1024, range(1, 1_000_000), unit "connections/s";
    /// Proxies (comma list of IPs or CIDRs) whose `X-Forwarded-For` names the client for the per-address limits: its right-most untrusted entry.
    trusted_proxies: Vec<Cidr> = Vec::new();
    /// Capacity of each core's inbound cross-core queue.
    mesh_queue_max: usize = 4096, range(16, NO_MAX), unit "messages";
    /// Threads of the blocking pool (storage, outbound HTTP).
    blocking_threads: usize = 2, range(1, 64), unit "threads";
    /// Requests queued or running on the blocking pool before callers are told it is overloaded.
    blocking_queue_max: usize = 4096, range(1, NO_MAX), unit "requests";
    /// Log line format on stderr, `text` or `json` (level from `RUST_LOG`).
    log_format: LogFormat = LogFormat::Text;
    /// I/O driver of the cores: `auto` (io_uring when the kernel allows it), `iouring` or `epoll`.
    io_driver: IoDriver = IoDriver::Auto;
    /// A session with no connection and no activity for this long leaves memory (it stays stored; see `session_end_idle_secs` for ending it).
    session_idle_secs: u64 = 1800, range(1, NO_MAX), unit "s",
        derived "1800, or session_end_idle_secs when that is set lower";
    /// A session with no activity (messages, help requests, admins joining or leaving) for this long is ended (state `ended`, end time set, audit `ended_idle`), in memory or only stored; its connections get `session_ended`.
    session_end_idle_secs: u64 = 86_400, range(1, NO_MAX), unit "s",
        derived "86400, or session_idle_secs when that is set higher";
    /// After the last admin hands a session back to the AI, `help_request` on it is refused for this long (0: no cooldown).
    help_cooldown_secs: u64 = 60, range(0, 86_400), unit "s";
    /// Sessions one user may have in memory at once.
    sessions_per_user_max: usize = 64, range(1, NO_MAX), unit "sessions";
    /// Messages `resume` returns at most (the latest ones).
    history_messages_max: usize = 200, range(1, 10_000), unit "messages";
    /// Longest message `content`.
    content_chars_max: usize = 8000, range(1, NO_MAX), unit "chars";
    /// Largest `metadata` object, as JSON.
    metadata_bytes_max: usize = 4096, range(2, NO_MAX), unit "bytes";
    /// Longest answer kept and streamed.
    answer_bytes_max: usize = 256 * 1024, range(1024, NO_MAX), unit "bytes";
    /// Pause between the demo provider's chunks.
    demo_chunk_delay_ms: u64 = 20, unit "ms";
    /// Writes queued for storage before clients are told it is overloaded.
    store_queue_max: usize = 4096, range(1, NO_MAX), unit "writes";
    /// How long the embedded store may hold applied writes before it commits them: each core appends its writes to a journal under `data_dir` and syncs it itself, so acks wait for the journal, not the commit (0: no journals, every write commits before its ack). MongoDB always acknowledges after its write concern.
    store_commit_interval_ms: u64 = 100, range(0, 10_000), unit "ms";
    /// Messages (or sessions) per page read from storage while the admin transcript and export stream.
    admin_page_messages: usize = 200, range(1, 10_000), unit "rows";
    /// Read connections of the embedded store (a fixed pool; a read waits for one, never opens another).
    sqlite_readers_max: usize = 2, range(1, 256), unit "connections",
        derived "blocking_threads";
    /// How long a read waits for a free read connection before the request is refused (503 / `unavailable`).
    store_read_wait_ms: u64 = 2000, range(1, 60_000), unit "ms";
    /// Frames of any kind one connection may send per minute (burst the same); beyond it, close 1008.
    ws_frames_per_minute_max: u32 = 600, unit "frames/min",
        derived "max(600, 10 x rate_limit_per_minute)";
    /// The system prompt sent before every conversation.
    llm_system_prompt: String = "You are a helpful, concise customer support assistant.".into();
    /// Latest messages of a session sent upstream as context.
    llm_context_messages_max: usize = 20, range(1, 1000), unit "messages";
    /// Characters of context sent upstream at most (oldest messages dropped first).
    llm_context_chars_max: usize = 24_000, range(100, NO_MAX), unit "chars";
    /// How long an answer keeps streaming after the user's last connection closed, so a quick reconnect resumes it.
    llm_grace_secs: u64 = 15, unit "s";
    /// Largest server-sent event (one line, or all `data` lines of one event) taken from an LLM provider; beyond it the answer fails (error kind `too_large`).
    llm_event_bytes_max: usize = 1024 * 1024, range(1024, NO_MAX), unit "bytes";
    /// Admin API requests per admin per minute (burst the same), per core.
    admin_rate_limit_per_minute: u32 = 600, unit "requests/min";
    /// Largest upload (`POST {prefix}/upload`, the file itself); 413 beyond, before the body is read when `Content-Length` says so.
    upload_bytes_max: u64 = 10 * 1024 * 1024, range(1, NO_MAX), unit "bytes";
    /// Types an upload may have, decided from its first bytes, never from its name or declared type (comma list of MIME types; anything else is 415).
    upload_types_allowed: Vec<String> = super::UPLOAD_TYPES_DEFAULT.iter().map(|t| t.to_string()).collect();
    /// Uploads one user may start per minute (token bucket, burst the same), per core; 429 beyond.
    upload_rate_limit_per_minute: u32 = 30, range(1, 1_000_000), unit "uploads/min";
    /// Bytes of uploaded files one user may keep stored; an upload past it is 413 `quota_exceeded` (0: no quota).
    upload_quota_bytes: u64 = 100 * 1024 * 1024, unit "bytes";
    /// Time an upload or a file download may take in all, in place of http_request_timeout_ms (10 MiB on a slow mobile link takes minutes).
    file_transfer_timeout_ms: u64 = 300_000, range(10, NO_MAX), unit "ms";
    /// Who transcribes voice messages: `openai` (an OpenAI-compatible `/v1/audio/transcriptions`: OpenAI, faster-whisper or whisper.cpp servers) or `demo` (offline).
    stt_provider: SttProvider = SttProvider::Demo;
    /// The transcription API's base (https, or http on loopback); requests go to `{stt_base_url}/v1/audio/transcriptions` (a base ending in `/v1` is not doubled). OpenAI's by default.
    stt_base_url: Option<String> = None;
    /// The transcription API's key, sent as `Authorization: Bearer`.
    #[secret]
    stt_api_key: Option<String> = None;
    /// The transcription model the provider is asked for.
    stt_model: String = "whisper-1".into();
    /// How long one transcription request may take (sending the audio, waiting, reading the answer).
    stt_timeout_ms: u64 = 60_000, range(100, 600_000), unit "ms";
    /// Retries of a transcription that failed with 429, 5xx, a timeout or a broken connection (jittered backoff, or Retry-After).
    stt_max_retries: u32 = 2, range(0, 10), unit "retries";
    /// Longest voice message transcribed, where its container says its duration (WAV, Ogg, MP3); longer ones fail with `transcription_failed` before the provider is asked.
    voice_seconds_max: u64 = 300, range(1, 3600), unit "s";
    /// Where sealed upload bytes live: `local` (under `data_dir`), `s3` (an S3-compatible bucket) or `gridfs` (MongoDB GridFS in `mongo_database`); cluster mode needs `s3` or `gridfs`.
    file_store: Option<String> = None,
        derived "s3 when s3_bucket is set, else gridfs in cluster mode (nats_url and mongo_uri set), else local";
    /// The S3-compatible API's base URL (https, or http on loopback), e.g. a MinIO or Ceph gateway; unset: AWS S3 in `s3_region`.
    s3_endpoint: Option<String> = None;
    /// The bucket uploads are stored in (it must exist); set, `file_store` defaults to `s3`.
    s3_bucket: Option<String> = None;
    /// The bucket's region (signing needs one even where the server ignores it).
    s3_region: String = "us-east-1".into();
    /// Access key id for the bucket; unset (with the secret unset too), credentials come from the EC2/ECS instance metadata service.
    #[secret]
    s3_access_key_id: Option<String> = None;
    /// Secret access key for the bucket (with `s3_access_key_id`).
    #[secret]
    s3_secret_access_key: Option<String> = None;
    /// Help requests are POSTed here (https, or http on loopback), signed with `notify_webhook_secret`.
    #[secret]
    notify_webhook_url: Option<String> = None;
    /// HMAC key of the webhook's `X-Chatbox-Signature` (16+ characters; required with a webhook URL).
    #[secret]
    notify_webhook_secret: Option<String> = None;
    /// Help requests are e-mailed through this SMTP server.
    notify_smtp_host: Option<String> = None;
    /// The SMTP server's port.
    notify_smtp_port: u16 = 587, unit "port",
        derived "587, or 465 when notify_smtp_tls is tls";
    /// SMTP transport security: `starttls`, `tls` or `none` (with a login, only to a loopback host).
    notify_smtp_tls: String = "starttls".into();
    /// SMTP login name.
    notify_smtp_username: Option<String> = None;
    /// SMTP password.
    #[secret]
    notify_smtp_password: Option<String> = None;
    /// Sender address of help-request e-mails (required with an SMTP host).
    notify_email_from: Option<String> = None;
    /// Recipients of help-request e-mails (comma list; required with an SMTP host).
    notify_email_to: Vec<String> = Vec::new();
    /// Delivery attempts before a notification is dead-lettered.
    notify_max_attempts: u32 = 8, unit "attempts";
    /// First retry delay of a notification; doubles per attempt (with jitter).
    notify_retry_base_ms: u64 = 1000, unit "ms";
    /// Delivered notifications are deleted from the outbox this long after delivery.
    outbox_delivered_retention_secs: u64 = 7 * 86_400, range(1, NO_MAX), unit "s",
        derived "604800, or outbox_dead_retention_secs when that is set lower";
    /// Dead letters (notifications given up) are deleted this long after they were queued; at least `outbox_delivered_retention_secs`.
    outbox_dead_retention_secs: u64 = 30 * 86_400, range(1, NO_MAX), unit "s",
        derived "2592000, or outbox_delivered_retention_secs when that is set higher";
    /// NATS servers (comma list of `nats://host:port`); set, this node runs in cluster mode (docs/CLUSTER.md) and needs `mongo_uri`.
    #[secret]
    nats_url: Vec<String> = Vec::new();
    /// This node's name on the bus (letters, digits, `-`, `_`; at most 64); the host name, process id and a random tag drawn at start by default.
    node_id: Option<String> = None;
    /// Every bus subject sits under this prefix, so several clusters can share one bus.
    nats_subject_prefix: String = "chatbox".into();
    /// How often a node tells the others it is alive.
    cluster_heartbeat_ms: u64 = 1000, range(50, 60_000), unit "ms";
    /// Silence after which another node counts as gone.
    cluster_member_timeout_ms: u64 = 3000, range(150, 600_000), unit "ms",
        derived "3 x cluster_heartbeat_ms";
    /// How long a node's lease on its users outlives its last renewal (renewed every third of it): after a node is killed or cut off, its users can be written by another node this long after.
    lease_ttl_ms: u64 = 6000, range(300, 3_600_000), unit "ms",
        derived "2 x cluster_member_timeout_ms";
    /// How long a request to every node (disconnect, delete) waits for their answers.
    bus_request_timeout_ms: u64 = 2000, range(50, 60_000), unit "ms";
    /// `[[llm.models]]`: several models (provider, endpoint, key, timeouts, fallback), in the environment a JSON or TOML array; empty: the `llm_*` keys define one.
    llm: LlmSection = LlmSection::default(), file "llm.models", env "CHATBOX_LLM_MODELS";
}
