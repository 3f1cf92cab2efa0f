//! The one typed configuration: defaults, TOML file, `CHATBOX_*` overrides, validation.
//!
//! Every key of the TOML file can be overridden by the environment variable
//! `CHATBOX_<KEY IN UPPER CASE>`. Limits carry their unit last in the name
//! (`ws_frame_bytes_max`, `ws_ping_interval_ms`), as TigerBeetle's style asks, so a
//! reader never guesses whether a number is bytes or kilobytes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What went wrong while loading or validating the configuration. Each message
/// names the key (or variable) and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("environment variable {var}={value:?} is not valid: {reason}")]
    Env {
        var: String,
        value: String,
        reason: String,
    },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The LLM provider that answers users. Only `demo` exists before the LLM issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    Demo,
    Openai,
    Anthropic,
}

/// Which I/O driver the cores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring when the kernel allows it, epoll otherwise.
    Auto,
    /// io_uring, falling back to epoll (with a warning) when it cannot start.
    Iouring,
    Epoll,
}

impl FromEnv for IoDriver {
    fn from_env(value: &str) -> Result<Self, String> {
        match value.trim() {
            "auto" => Ok(IoDriver::Auto),
            "iouring" | "io_uring" => Ok(IoDriver::Iouring),
            "epoll" => Ok(IoDriver::Epoll),
            _ => Err("expected one of: auto, iouring, epoll".into()),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The whole configuration. Defaults are those documented in README.md and SPEC.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port every core listens on (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Core threads; 0 means one per available CPU.
    pub cores: usize,
    /// URL prefix of every endpoint, e.g. `/chatbox`; empty for none.
    pub path_prefix: String,
    /// HMAC secret for HS256 JWTs (required outside `--dev`).
    pub jwt_secret: Option<String>,
    /// 64 hex characters (32 bytes) for AES-256-GCM at rest (required outside `--dev`).
    pub encryption_key: Option<String>,
    /// Earlier keys, still used to read what they encrypted (rotation).
    pub encryption_previous_keys: Vec<String>,
    /// Origins allowed to open a WebSocket from a browser; `*` allows all.
    pub allowed_origins: Vec<String>,
    /// Embedded store directory.
    pub data_dir: PathBuf,
    /// Use MongoDB instead of the embedded store (`mongodb://host:port,...`;
    /// `mongodb+srv://` needs DNS lookups this build does not include).
    pub mongo_uri: Option<String>,
    /// The MongoDB database chatbox uses.
    pub mongo_database: String,
    /// How many nodes acknowledge a write before its ack: `majority` or a number.
    pub mongo_write_concern: String,
    /// How long writes are retried while MongoDB is unreachable before they fail.
    pub mongo_write_retry_secs: u64,
    /// How long start-up and health checks wait to reach MongoDB.
    pub mongo_connect_timeout_ms: u64,
    pub llm_provider: LlmProvider,
    pub llm_base_url: Option<String>,
    pub llm_api_key: Option<String>,
    pub llm_model: Option<String>,
    /// WebSocket connections one user may hold at once.
    pub max_connections_per_user: u32,
    /// User messages per minute (token bucket; burst = the same number).
    pub rate_limit_per_minute: u32,
    /// Graceful shutdown drains for at most this long.
    pub shutdown_timeout_secs: u64,
    /// Opt-in echo endpoint (relative to the prefix) for WebSocket conformance runs.
    /// Unauthenticated: leave it unset in production.
    pub echo_path: Option<String>,
    /// Bearer token required by `/metrics` when set.
    pub metrics_token: Option<String>,
    /// Largest WebSocket frame payload accepted from a client.
    pub ws_frame_bytes_max: usize,
    /// Largest (reassembled) WebSocket message accepted from a client.
    pub ws_message_bytes_max: usize,
    /// Bytes queued for a slow client before the connection is closed (1013).
    pub ws_write_buffer_bytes_max: usize,
    /// Frames queued for one connection by other tasks before it counts as slow.
    pub ws_outbox_frames_max: u32,
    /// Silence after which the server pings a client.
    pub ws_ping_interval_ms: u64,
    /// Time a client has to answer a ping before it is disconnected.
    pub ws_pong_timeout_ms: u64,
    /// Time a client has to send a complete request head.
    pub http_head_timeout_ms: u64,
    /// Time a plain HTTP request (head, body, response) may take in all.
    pub http_request_timeout_ms: u64,
    /// Largest request head (request line and headers).
    pub http_head_bytes_max: usize,
    /// Largest request body on plain HTTP endpoints.
    pub http_body_bytes_max: usize,
    /// Open connections one core holds before it refuses more with 503.
    pub connections_per_core_max: usize,
    /// Capacity of each core's inbound cross-core queue.
    pub mesh_queue_max: usize,
    /// Threads of the blocking pool (storage, outbound HTTP).
    pub blocking_threads: usize,
    /// Requests queued or running on the blocking pool before callers get `Overloaded`.
    pub blocking_queue_max: usize,
    pub log_format: LogFormat,
    pub io_driver: IoDriver,
    /// A session with no connection and no activity for this long leaves memory
    /// (it stays stored and comes back on `resume`).
    pub session_idle_secs: u64,
    /// Sessions one user may have in memory at once.
    pub sessions_per_user_max: usize,
    /// Messages `resume` returns at most (the latest ones).
    pub history_messages_max: usize,
    /// Longest message `content`, in characters.
    pub content_chars_max: usize,
    /// Largest `metadata` object, in bytes of JSON.
    pub metadata_bytes_max: usize,
    /// Longest answer kept and streamed, in bytes.
    pub answer_bytes_max: usize,
    /// Pause between the demo provider's chunks.
    pub demo_chunk_delay_ms: u64,
    /// Writes queued for storage before clients are told it is overloaded.
    pub store_queue_max: usize,
    /// Frames of any kind one connection may send per minute (burst the same);
    /// beyond it the connection is closed (1008) as a flood.
    pub ws_frames_per_minute_max: u32,
    /// The system prompt sent before every conversation.
    pub llm_system_prompt: String,
    /// Latest messages of a session sent upstream as context.
    pub llm_context_messages_max: usize,
    /// Characters of context sent upstream at most (oldest messages dropped first).
    pub llm_context_chars_max: usize,
    /// Admin API requests per admin per minute (burst the same), per core.
    pub admin_rate_limit_per_minute: u32,
    /// Help requests are POSTed here (https, or http on loopback), signed with
    /// `notify_webhook_secret` in `X-Chatbox-Signature: sha256=<hex HMAC>`.
    pub notify_webhook_url: Option<String>,
    pub notify_webhook_secret: Option<String>,
    /// Help requests are e-mailed through this SMTP server.
    pub notify_smtp_host: Option<String>,
    pub notify_smtp_port: u16,
    /// `none`, `starttls` or `tls`.
    pub notify_smtp_tls: String,
    pub notify_smtp_username: Option<String>,
    pub notify_smtp_password: Option<String>,
    pub notify_email_from: Option<String>,
    pub notify_email_to: Vec<String>,
    /// Attempts before a notification is dead-lettered.
    pub notify_max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter).
    pub notify_retry_base_ms: u64,
    /// How long an answer keeps streaming after the user's last connection closed,
    /// so a quick reconnect can resume it; then the upstream request is dropped.
    pub llm_grace_secs: u64,
    /// `[[llm.models]]`: several models, each with its provider, endpoint, key,
    /// timeouts and fallback. When empty, the `llm_*` keys above define one model.
    pub llm: crate::llm::LlmSection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cores: 0,
            path_prefix: "/chatbox".into(),
            jwt_secret: None,
            encryption_key: None,
            allowed_origins: Vec::new(),
            data_dir: PathBuf::from("./data"),
            mongo_uri: None,
            mongo_database: "chatbox".into(),
            mongo_write_concern: "majority".into(),
            mongo_write_retry_secs: 30,
            mongo_connect_timeout_ms: 5000,
            llm_provider: LlmProvider::Demo,
            llm_base_url: None,
            llm_api_key: None,
            llm_model: None,
            max_connections_per_user: 10,
            rate_limit_per_minute: 60,
            shutdown_timeout_secs: 20,
            echo_path: None,
            metrics_token: None,
            ws_frame_bytes_max: 64 * 1024,
            ws_message_bytes_max: 64 * 1024,
            ws_write_buffer_bytes_max: 1024 * 1024,
            ws_outbox_frames_max: 4096,
            ws_ping_interval_ms: 30_000,
            ws_pong_timeout_ms: 10_000,
            http_head_timeout_ms: 10_000,
            http_request_timeout_ms: 30_000,
            http_head_bytes_max: 16 * 1024,
            http_body_bytes_max: 1024 * 1024,
            connections_per_core_max: 100_000,
            mesh_queue_max: 4096,
            blocking_threads: 2,
            blocking_queue_max: 4096,
            log_format: LogFormat::Text,
            io_driver: IoDriver::Auto,
            encryption_previous_keys: Vec::new(),
            session_idle_secs: 1800,
            sessions_per_user_max: 64,
            history_messages_max: 200,
            content_chars_max: 8000,
            metadata_bytes_max: 4096,
            answer_bytes_max: 256 * 1024,
            demo_chunk_delay_ms: 20,
            store_queue_max: 4096,
            ws_frames_per_minute_max: 600,
            llm_system_prompt: "You are a helpful, concise customer support assistant.".into(),
            llm_context_messages_max: 20,
            llm_context_chars_max: 24_000,
            llm_grace_secs: 15,
            admin_rate_limit_per_minute: 600,
            notify_webhook_url: None,
            notify_webhook_secret: None,
            notify_smtp_host: None,
            notify_smtp_port: 587,
            notify_smtp_tls: "starttls".into(),
            notify_smtp_username: None,
            notify_smtp_password: None,
            notify_email_from: None,
            notify_email_to: Vec::new(),
            notify_max_attempts: 8,
            notify_retry_base_ms: 1000,
            llm: crate::llm::LlmSection::default(),
        }
    }
}

/// Parses one environment value into a field's type.
trait FromEnv: Sized {
    fn from_env(value: &str) -> Result<Self, String>;
}

macro_rules! from_env_via_parse {
    ($($t:ty),*) => {$(
        impl FromEnv for $t {
            fn from_env(value: &str) -> Result<Self, String> {
                value.trim().parse().map_err(|e| format!("{e}"))
            }
        }
    )*};
}
from_env_via_parse!(u16, u32, u64, usize, SocketAddr, PathBuf);

impl FromEnv for String {
    fn from_env(value: &str) -> Result<Self, String> {
        Ok(value.to_owned())
    }
}

impl<T: FromEnv> FromEnv for Option<T> {
    /// An empty value unsets an optional key.
    fn from_env(value: &str) -> Result<Self, String> {
        if value.is_empty() {
            Ok(None)
        } else {
            T::from_env(value).map(Some)
        }
    }
}

impl FromEnv for Vec<String> {
    /// A comma-separated list; blanks around items are ignored.
    fn from_env(value: &str) -> Result<Self, String> {
        Ok(value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

impl FromEnv for LlmProvider {
    fn from_env(value: &str) -> Result<Self, String> {
        match value.trim() {
            "demo" => Ok(LlmProvider::Demo),
            "openai" => Ok(LlmProvider::Openai),
            "anthropic" => Ok(LlmProvider::Anthropic),
            _ => Err("expected one of: demo, openai, anthropic".into()),
        }
    }
}

impl FromEnv for LogFormat {
    fn from_env(value: &str) -> Result<Self, String> {
        match value.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected one of: text, json".into()),
        }
    }
}

/// Applies `CHATBOX_<FIELD>` for every listed field, and returns the variable names
/// it knows so that a misspelt variable can be reported.
macro_rules! env_overrides {
    ($cfg:ident, $lookup:ident, [$($field:ident),* $(,)?]) => {{
        let mut known = Vec::new();
        $(
            let var = concat!("CHATBOX_", stringify!($field)).to_ascii_uppercase();
            if let Some(value) = $lookup(&var) {
                $cfg.$field = FromEnv::from_env(&value).map_err(|reason| ConfigError::Env {
                    var: var.clone(),
                    value: value.clone(),
                    reason,
                })?;
            }
            known.push(var);
        )*
        known
    }};
}

/// Environment variables that belong to the process, not to the config file.
const ENV_NOT_CONFIG: &[&str] = &[
    "CHATBOX_CONFIG",
    "CHATBOX_TEST_MONGO_URI",
    "CHATBOX_TEST_STORE",
];

impl Config {
    /// Loads the file (if any), then applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_toml_file(p)?,
            None => Config::default(),
        };
        let unknown = cfg.apply_env(|k| std::env::var(k).ok())?;
        for var in std::env::vars().map(|(k, _)| k) {
            if var.starts_with("CHATBOX_")
                && !unknown.contains(&var)
                && !ENV_NOT_CONFIG.contains(&var.as_str())
            {
                tracing::warn!(%var, "unknown CHATBOX_ variable ignored (misspelt?)");
            }
        }
        Ok(cfg)
    }

    pub fn from_toml_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Applies overrides from `lookup` (the environment, or a map in tests) and
    /// returns the set of variable names that are configuration keys.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<HashSet<String>, ConfigError> {
        let cfg = self;
        let known = env_overrides!(
            cfg,
            lookup,
            [
                listen,
                cores,
                path_prefix,
                jwt_secret,
                encryption_key,
                allowed_origins,
                data_dir,
                mongo_uri,
                mongo_database,
                mongo_write_concern,
                mongo_write_retry_secs,
                mongo_connect_timeout_ms,
                llm_provider,
                llm_base_url,
                llm_api_key,
                llm_model,
                max_connections_per_user,
                rate_limit_per_minute,
                shutdown_timeout_secs,
                echo_path,
                metrics_token,
                ws_frame_bytes_max,
                ws_message_bytes_max,
                ws_write_buffer_bytes_max,
                ws_outbox_frames_max,
                ws_ping_interval_ms,
                ws_pong_timeout_ms,
                http_head_timeout_ms,
                http_request_timeout_ms,
                http_head_bytes_max,
                http_body_bytes_max,
                connections_per_core_max,
                mesh_queue_max,
                blocking_threads,
                blocking_queue_max,
                log_format,
                io_driver,
                encryption_previous_keys,
                session_idle_secs,
                sessions_per_user_max,
                history_messages_max,
                content_chars_max,
                metadata_bytes_max,
                answer_bytes_max,
                demo_chunk_delay_ms,
                store_queue_max,
                ws_frames_per_minute_max,
                llm_system_prompt,
                llm_context_messages_max,
                llm_context_chars_max,
                llm_grace_secs,
                admin_rate_limit_per_minute,
                notify_webhook_url,
                notify_webhook_secret,
                notify_smtp_host,
                notify_smtp_port,
                notify_smtp_tls,
                notify_smtp_username,
                notify_smtp_password,
                notify_email_from,
                notify_email_to,
                notify_max_attempts,
                notify_retry_base_ms,
            ]
        );
        Ok(known.into_iter().collect())
    }

    /// Checks every value and reports all problems at once, each with its fix.
    /// `dev` relaxes the secrets that `--dev` generates itself.
    pub fn validate(&self, dev: bool) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                errs.push(msg);
            }
        };
        if let Some(uri) = &self.mongo_uri {
            check(
                uri.starts_with("mongodb://"),
                "CHATBOX_MONGO_URI must start with mongodb:// (mongodb+srv:// is not supported)"
                    .into(),
            );
        }
        check(
            self.mongo_write_concern == "majority"
                || self
                    .mongo_write_concern
                    .parse::<u32>()
                    .is_ok_and(|n| n >= 1),
            "CHATBOX_MONGO_WRITE_CONCERN must be majority or a number of nodes (>= 1)".into(),
        );
        check(
            !self.mongo_database.is_empty()
                && self.mongo_database.len() <= 63
                && !self
                    .mongo_database
                    .contains(['/', '\\', '.', ' ', '"', '$']),
            "CHATBOX_MONGO_DATABASE must be 1-63 characters without / \\ . space \" $".into(),
        );
        check(
            (1..=3600).contains(&self.mongo_write_retry_secs),
            "CHATBOX_MONGO_WRITE_RETRY_SECS must be between 1 and 3600".into(),
        );
        check(
            (100..=120_000).contains(&self.mongo_connect_timeout_ms),
            "CHATBOX_MONGO_CONNECT_TIMEOUT_MS must be between 100 and 120000".into(),
        );
        match &self.jwt_secret {
            None if !dev => check(
                false,
                "CHATBOX_JWT_SECRET is required (or start with --dev); make one with \
                 `openssl rand -hex 32`"
                    .into(),
            ),
            Some(s) if s.len() < 32 => check(
                false,
                format!(
                    "CHATBOX_JWT_SECRET is {} bytes; HS256 needs at least 32 \
                 (make one with `openssl rand -hex 32`)",
                    s.len()
                ),
            ),
            _ => {}
        }
        match &self.encryption_key {
            None if !dev => check(
                false,
                "CHATBOX_ENCRYPTION_KEY is required (or start with --dev); make one with \
                 `openssl rand -hex 32`"
                    .into(),
            ),
            Some(key) => {
                if let Err(e) = parse_encryption_key(key) {
                    check(false, e);
                }
            }
            None => {}
        }
        for key in &self.encryption_previous_keys {
            if let Err(e) = parse_encryption_key(key) {
                check(false, format!("CHATBOX_ENCRYPTION_PREVIOUS_KEYS: {e}"));
            }
        }
        let p = &self.path_prefix;
        check(
            p.is_empty() || (p.starts_with('/') && !p.ends_with('/') && !p.contains(['?', '#'])),
            format!(
                "CHATBOX_PATH_PREFIX {p:?} must be empty or start with '/' and not end with '/'"
            ),
        );
        if let Some(e) = &self.echo_path {
            check(
                e.starts_with('/')
                    && e.len() > 1
                    && !["/ws", "/healthz", "/readyz", "/metrics"].contains(&e.as_str()),
                format!(
                    "CHATBOX_ECHO_PATH {e:?} must start with '/' and not be a built-in endpoint"
                ),
            );
        }
        for o in &self.allowed_origins {
            check(
                o == "*" || valid_origin(o),
                format!(
                    "CHATBOX_ALLOWED_ORIGINS entry {o:?} must be `*` or scheme://host[:port] \
                     with no path, e.g. https://support.example.com"
                ),
            );
        }
        check(
            self.cores <= 1024,
            format!("CHATBOX_CORES={} is more than 1024", self.cores),
        );
        check(
            (1..=10_000).contains(&self.max_connections_per_user),
            "CHATBOX_MAX_CONNECTIONS_PER_USER must be between 1 and 10000".into(),
        );
        check(
            (1..=1_000_000).contains(&self.rate_limit_per_minute),
            "CHATBOX_RATE_LIMIT_PER_MINUTE must be between 1 and 1000000".into(),
        );
        check(
            (1..=3600).contains(&self.shutdown_timeout_secs),
            "CHATBOX_SHUTDOWN_TIMEOUT_SECS must be between 1 and 3600".into(),
        );
        check(
            (125..=64 * 1024 * 1024).contains(&self.ws_frame_bytes_max),
            "CHATBOX_WS_FRAME_BYTES_MAX must be between 125 and 67108864".into(),
        );
        check(
            self.ws_message_bytes_max >= self.ws_frame_bytes_max
                && self.ws_message_bytes_max <= 64 * 1024 * 1024,
            "CHATBOX_WS_MESSAGE_BYTES_MAX must be at least CHATBOX_WS_FRAME_BYTES_MAX and at most 67108864".into(),
        );
        check(
            self.ws_write_buffer_bytes_max >= 64 * 1024,
            "CHATBOX_WS_WRITE_BUFFER_BYTES_MAX must be at least 65536".into(),
        );
        check(
            (1..=1_000_000).contains(&self.ws_outbox_frames_max),
            "CHATBOX_WS_OUTBOX_FRAMES_MAX must be between 1 and 1000000".into(),
        );
        check(
            self.ws_ping_interval_ms >= 10,
            "CHATBOX_WS_PING_INTERVAL_MS must be at least 10".into(),
        );
        check(
            self.ws_pong_timeout_ms >= 10,
            "CHATBOX_WS_PONG_TIMEOUT_MS must be at least 10".into(),
        );
        check(
            self.http_head_timeout_ms >= 10,
            "CHATBOX_HTTP_HEAD_TIMEOUT_MS must be at least 10".into(),
        );
        check(
            self.http_request_timeout_ms >= self.http_head_timeout_ms,
            "CHATBOX_HTTP_REQUEST_TIMEOUT_MS must be at least CHATBOX_HTTP_HEAD_TIMEOUT_MS".into(),
        );
        check(
            (1024..=1024 * 1024).contains(&self.http_head_bytes_max),
            "CHATBOX_HTTP_HEAD_BYTES_MAX must be between 1024 and 1048576".into(),
        );
        check(
            self.connections_per_core_max >= 1,
            "CHATBOX_CONNECTIONS_PER_CORE_MAX must be at least 1".into(),
        );
        check(
            self.mesh_queue_max >= 16,
            "CHATBOX_MESH_QUEUE_MAX must be at least 16".into(),
        );
        check(
            (1..=64).contains(&self.blocking_threads),
            "CHATBOX_BLOCKING_THREADS must be between 1 and 64".into(),
        );
        check(
            self.session_idle_secs >= 1,
            "CHATBOX_SESSION_IDLE_SECS must be at least 1".into(),
        );
        check(
            self.sessions_per_user_max >= 1,
            "CHATBOX_SESSIONS_PER_USER_MAX must be at least 1".into(),
        );
        check(
            (1..=10_000).contains(&self.history_messages_max),
            "CHATBOX_HISTORY_MESSAGES_MAX must be between 1 and 10000".into(),
        );
        check(
            self.content_chars_max >= 1,
            "CHATBOX_CONTENT_CHARS_MAX must be at least 1".into(),
        );
        check(
            self.metadata_bytes_max >= 2,
            "CHATBOX_METADATA_BYTES_MAX must be at least 2".into(),
        );
        check(
            self.answer_bytes_max >= 1024,
            "CHATBOX_ANSWER_BYTES_MAX must be at least 1024".into(),
        );
        check(
            self.store_queue_max >= 1,
            "CHATBOX_STORE_QUEUE_MAX must be at least 1".into(),
        );
        check(
            self.ws_frames_per_minute_max >= self.rate_limit_per_minute,
            "CHATBOX_WS_FRAMES_PER_MINUTE_MAX must be at least CHATBOX_RATE_LIMIT_PER_MINUTE"
                .into(),
        );
        check(
            self.blocking_queue_max >= 1,
            "CHATBOX_BLOCKING_QUEUE_MAX must be at least 1".into(),
        );
        check(
            (1..=1000).contains(&self.llm_context_messages_max),
            "CHATBOX_LLM_CONTEXT_MESSAGES_MAX must be between 1 and 1000".into(),
        );
        check(
            self.llm_context_chars_max >= 100,
            "CHATBOX_LLM_CONTEXT_CHARS_MAX must be at least 100".into(),
        );
        for e in crate::llm::validate(self)
            .into_iter()
            .chain(crate::notify::validate(self))
        {
            check(false, e);
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }

    /// Number of core threads to run.
    pub fn core_count(&self) -> usize {
        if self.cores > 0 {
            self.cores
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// Decodes a 64-hex-character key, or says how to make a right one.
pub fn parse_encryption_key(key: &str) -> Result<[u8; 32], String> {
    let how = "make one with `openssl rand -hex 32`";
    let bytes = hex::decode(key.trim()).map_err(|_| {
        format!("CHATBOX_ENCRYPTION_KEY must be 64 hex characters (32 bytes); {how}")
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "CHATBOX_ENCRYPTION_KEY is {} bytes; it must be exactly 32 (64 hex characters); {how}",
            b.len()
        )
    })
}

/// `scheme://host[:port]` with nothing after it.
fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.path_prefix, "/chatbox");
        assert_eq!(c.max_connections_per_user, 10);
        assert_eq!(c.rate_limit_per_minute, 60);
        assert_eq!(c.shutdown_timeout_secs, 20);
        assert_eq!(c.llm_provider, LlmProvider::Demo);
        assert!(c.allowed_origins.is_empty());
        assert!(c.echo_path.is_none());
    }

    #[test]
    fn env_overrides_file_values_with_types() {
        let mut c: Config = toml::from_str("cores = 3\npath_prefix = \"/x\"").unwrap();
        c.apply_env(env(&[
            ("CHATBOX_CORES", "2"),
            (
                "CHATBOX_ALLOWED_ORIGINS",
                "https://a.example, https://b.example",
            ),
            ("CHATBOX_LLM_PROVIDER", "anthropic"),
            ("CHATBOX_ECHO_PATH", "/echo"),
        ]))
        .unwrap();
        assert_eq!(c.cores, 2);
        assert_eq!(c.path_prefix, "/x");
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(c.llm_provider, LlmProvider::Anthropic);
        assert_eq!(c.echo_path.as_deref(), Some("/echo"));
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let mut c = Config::default();
        let e = c
            .apply_env(env(&[("CHATBOX_CORES", "many")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CHATBOX_CORES") && e.contains("many"), "{e}");
        let e = c.apply_env(env(&[("CHATBOX_MAX_CONNECTIONS_PER_USER", "-1")]));
        assert!(e.is_err());
    }

    #[test]
    fn empty_value_unsets_an_optional_key() {
        let mut c = Config {
            metrics_token: Some("t".into()),
            ..Config::default()
        };
        c.apply_env(env(&[("CHATBOX_METRICS_TOKEN", "")])).unwrap();
        assert_eq!(c.metrics_token, None);
    }

    #[test]
    fn unknown_toml_key_is_an_error() {
        let e = toml::from_str::<Config>("max_conections_per_user = 3").unwrap_err();
        assert!(e.to_string().contains("max_conections_per_user"), "{e}");
    }

    #[test]
    fn secret_required_outside_dev_and_errors_are_collected() {
        let c = Config {
            path_prefix: "chatbox/".into(),
            max_connections_per_user: 0,
            ..Config::default()
        };
        let e = c.validate(false).unwrap_err().to_string();
        assert!(e.contains("CHATBOX_JWT_SECRET is required"), "{e}");
        assert!(e.contains("openssl rand -hex 32"), "{e}");
        assert!(e.contains("CHATBOX_PATH_PREFIX"), "{e}");
        assert!(e.contains("CHATBOX_MAX_CONNECTIONS_PER_USER"), "{e}");
        assert!(e.contains("CHATBOX_ENCRYPTION_KEY is required"), "{e}");
        let dev = Config::default();
        dev.validate(true).unwrap();
    }

    #[test]
    fn encryption_key_must_be_32_bytes_of_hex() {
        assert!(parse_encryption_key(&"ab".repeat(32)).is_ok());
        let e = parse_encryption_key(&"ab".repeat(16)).unwrap_err();
        assert!(
            e.contains("16 bytes") && e.contains("openssl rand -hex 32"),
            "{e}"
        );
        assert!(parse_encryption_key("not hex")
            .unwrap_err()
            .contains("64 hex"));
    }

    #[test]
    fn origins_must_be_bare_origins() {
        for ok in ["https://a.example", "http://localhost:3000", "*"] {
            let c = Config {
                allowed_origins: vec![ok.into()],
                ..Config::default()
            };
            c.validate(true).unwrap();
        }
        for bad in [
            "a.example",
            "https://a.example/",
            "https://a.example/path",
            "https://",
        ] {
            let c = Config {
                allowed_origins: vec![bad.into()],
                ..Config::default()
            };
            assert!(c.validate(true).is_err(), "{bad} accepted");
        }
    }
}
