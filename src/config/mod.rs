//! The one typed configuration: keys declared once ([`keys`]), a TOML file,
//! `CHATBOX_*` overrides ([`env`]), defaults that follow other keys ([`derive`]),
//! and validation of the configuration's own rules ([`validate`]).
//!
//! Every key of the TOML file can be overridden by the environment variable
//! `CHATBOX_<KEY IN UPPER CASE>` (`[[llm.models]]` by `CHATBOX_LLM_MODELS`). Limits
//! carry their unit last in the name (`ws_frame_bytes_max`, `ws_ping_interval_ms`),
//! as TigerBeetle's style asks, so a reader never guesses whether a number is bytes
//! or kilobytes. This module is a leaf: it uses nothing else of the crate, so every
//! other module can depend on it; checks that need other modules are composed by
//! [`crate::check_config`].

pub mod cidr;
mod derive;
mod env;
pub mod keys;
pub mod models;
pub mod render;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use cidr::Cidr;
pub use derive::frames_per_minute_for;
pub use keys::{Config, Key, KEYS};
pub use models::{LlmSection, ModelConfig};
pub use validate::parse_encryption_key;

/// What `upload_types_allowed` holds unless set: the images support staff are
/// sent (PNG, JPEG, GIF, WebP), PDF, and the audio of voice notes (Ogg/Opus,
/// WebM, MP4/M4A, MP3, WAV), named as the `infer` crate names them.
pub const UPLOAD_TYPES_DEFAULT: [&str; 12] = [
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "audio/ogg",
    "audio/opus",
    "video/webm",
    "video/mp4",
    "audio/m4a",
    "audio/mpeg",
    "audio/x-wav",
];

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

/// The LLM provider that answers users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    Demo,
    Openai,
    Anthropic,
}

/// The speech-to-text provider that transcribes voice messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SttProvider {
    /// Offline: a transcript that says what it heard (duration, size), no network.
    Demo,
    /// OpenAI-compatible `/v1/audio/transcriptions` (OpenAI, faster-whisper and
    /// whisper.cpp servers).
    Openai,
}

/// Which I/O driver the cores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring when the kernel allows it, epoll otherwise.
    Auto,
    /// io_uring, falling back to epoll (with a warning) when it cannot start.
    #[serde(alias = "io_uring")]
    Iouring,
    Epoll,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A loaded configuration and what loading noticed. Loading happens before logging
/// starts (the log format is a key), so the caller logs these once it has a log.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Worth a warning, not worth refusing to start: unknown `CHATBOX_*` variables.
    pub warnings: Vec<String>,
    /// Defaults derived from other keys, e.g. the frame guard from the rate limit.
    pub derived: Vec<String>,
}

impl Config {
    /// Loads the file (if any), then applies the process environment, then derives
    /// the defaults that follow other keys.
    pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?,
            ),
            None => None,
        };
        let file = path.zip(text.as_deref());
        // Names only: a variable whose value is not UTF-8 is still a name to check.
        let names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
        Self::from_sources(file, |k| std::env::var(k).ok(), names)
    }

    /// [`Config::load`] without the process: the file's path and text, a lookup
    /// for variables, and the names of the variables that are set.
    pub fn from_sources(
        file: Option<(&Path, &str)>,
        lookup: impl Fn(&str) -> Option<String>,
        names: impl IntoIterator<Item = String>,
    ) -> Result<Loaded, ConfigError> {
        let (mut config, mut set) = match file {
            Some((path, text)) => parse_file(path, text)?,
            None => (Config::default(), Vec::new()),
        };
        set.extend(config.apply_env_with(&lookup)?);
        let derived = config.derive_defaults(&set);
        Ok(Loaded {
            config,
            warnings: env::unknown(names),
            derived,
        })
    }

    /// Applies overrides from `lookup` (the environment, or a map in tests) and
    /// returns the keys they set. Derived defaults are left alone.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<&'static str>, ConfigError> {
        self.apply_env_with(&lookup)
    }

    /// Number of core threads to run.
    pub fn core_count(&self) -> usize {
        if self.cores > 0 {
            self.cores
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Where uploads are stored (`local`, `s3` or `gridfs`): `file_store`, or
    /// what it derives to when a library caller left it unset, and why.
    pub fn file_store_choice(&self) -> (&str, &'static str) {
        match &self.file_store {
            Some(s) if s.as_str() == derive::file_store_for(self).0 => {
                (s.as_str(), derive::file_store_for(self).1)
            }
            Some(s) => (s.as_str(), "set by file_store"),
            None => derive::file_store_for(self),
        }
    }

    /// Whether this node is one of a cluster (`nats_url` set).
    pub fn cluster(&self) -> bool {
        !self.nats_url.is_empty()
    }

    /// This node's name on the bus: `node_id`, or the host name and process id
    /// (each character a subject may not hold becomes `-`), so that a restarted
    /// process is a new member.
    pub fn node_name(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let host: String = host
            .chars()
            .take(40)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let host = if host.is_empty() { "node".into() } else { host };
        // In a container the pid is always 1 and the host name survives a
        // restart: a random tag drawn once per process keeps the name unique.
        static TAG: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
        let tag = TAG.get_or_init(rand::random::<u16>);
        format!("{host}-{}-{tag:04x}", std::process::id())
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }

    /// How long answers may finish at shutdown: `shutdown_grace_secs`, but never
    /// more than half the shutdown deadline (the rest is for storing and closing).
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs).min(self.shutdown_timeout() / 2)
    }
}

/// The file's configuration, and the keys it sets (those keep their value even
/// where a default would have been derived).
fn parse_file(path: &Path, text: &str) -> Result<(Config, Vec<&'static str>), ConfigError> {
    let invalid = |source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let config: Config = toml::from_str(text).map_err(invalid)?;
    let table: toml::Table = toml::from_str(text).map_err(invalid)?;
    let set = KEYS
        .iter()
        .filter(|k| table.contains_key(k.field))
        .map(|k| k.field)
        .collect();
    Ok((config, set))
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
    fn the_default_node_name_is_the_host_the_pid_and_a_tag_drawn_once() {
        let c = Config::default();
        let name = c.node_name();
        assert_eq!(name, c.node_name(), "drawn once per process");
        let pid = format!("-{}-", std::process::id());
        assert!(name.contains(&pid), "{name}");
        let tag = name.rsplit('-').next().unwrap();
        assert!(
            tag.len() == 4 && tag.chars().all(|c| c.is_ascii_hexdigit()),
            "{name}"
        );
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

    fn load(file: Option<&str>, vars: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let names = vars.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>();
        Config::from_sources(file.map(|t| (Path::new("test.toml"), t)), env(vars), names)
    }

    #[test]
    fn raising_the_rate_limit_alone_derives_the_frame_guard() {
        let l = load(None, &[("CHATBOX_RATE_LIMIT_PER_MINUTE", "5000")]).unwrap();
        assert_eq!(l.config.ws_frames_per_minute_max, 50_000);
        assert_eq!(l.derived.len(), 1, "{:?}", l.derived);
        l.config.validate(true).unwrap();
        // The same from the file.
        let l = load(Some("rate_limit_per_minute = 5000"), &[]).unwrap();
        assert_eq!(l.config.ws_frames_per_minute_max, 50_000);
        // A guard set anywhere is kept, and contradicting the rate is an error.
        let l = load(
            Some("ws_frames_per_minute_max = 700"),
            &[("CHATBOX_RATE_LIMIT_PER_MINUTE", "5000")],
        )
        .unwrap();
        assert_eq!(l.config.ws_frames_per_minute_max, 700);
        let e = l.config.validate(true).unwrap_err().to_string();
        assert!(e.contains("leave it unset"), "{e}");
    }

    #[test]
    fn unknown_variables_become_warnings_not_errors() {
        let l = load(
            None,
            &[
                ("CHATBOX_FOO", "1"),
                ("CHATBOX_LISTEN", "127.0.0.1:9"),
                ("CHATBOX_CONFIG", "x.toml"),
                ("CHATBOX_TEST_STORE", "mongo"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(l.warnings[0].contains("CHATBOX_FOO"), "{:?}", l.warnings);
        assert_eq!(l.config.listen.port(), 9);
    }

    #[test]
    fn file_errors_name_the_file() {
        let e = load(Some("cores = \"two\""), &[]).unwrap_err().to_string();
        assert!(e.contains("test.toml"), "{e}");
    }

    #[test]
    fn model_list_from_the_environment_as_json_or_toml() {
        let json = r#"[{"id": "a", "provider": "openai", "base_url": "http://127.0.0.1:1/v1"},
                      {"id": "b", "provider": "demo", "fallback": "a"}]"#;
        let l = load(None, &[("CHATBOX_LLM_MODELS", json)]).unwrap();
        let ids: Vec<_> = l.config.llm.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(l.config.llm.models[0].max_retries, 2, "defaults apply");
        let toml = r#"[{ id = "t", provider = "anthropic", max_tokens = 7 }]"#;
        let l = load(None, &[("CHATBOX_LLM_MODELS", toml)]).unwrap();
        assert_eq!(l.config.llm.models[0].provider, LlmProvider::Anthropic);
        assert_eq!(l.config.llm.models[0].max_tokens, 7);
        let e = load(None, &[("CHATBOX_LLM_MODELS", "[{\"id\": 3}]")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CHATBOX_LLM_MODELS") && e.contains("JSON"),
            "{e}"
        );
        let l = load(None, &[("CHATBOX_LLM_MODELS", "")]).unwrap();
        assert!(l.config.llm.models.is_empty());
    }

    #[test]
    fn enumerations_read_the_same_names_as_the_file() {
        let l = load(
            None,
            &[
                ("CHATBOX_IO_DRIVER", "io_uring"),
                ("CHATBOX_LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(l.config.io_driver, IoDriver::Iouring);
        assert_eq!(l.config.log_format, LogFormat::Json);
        let e = load(None, &[("CHATBOX_LLM_PROVIDER", "gpt")]).unwrap_err();
        assert!(e.to_string().contains("openai"), "{e}");
    }

    #[test]
    fn trusted_proxies_are_networks_in_the_file_and_the_environment() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let l = load(None, &[("CHATBOX_TRUSTED_PROXIES", "10.0.0.0/8, ::1")]).unwrap();
        let p = &l.config.trusted_proxies;
        assert!(p.len() == 2 && p[0].contains(ip("10.9.9.9")) && p[1].contains(ip("::1")));
        let l = load(Some("trusted_proxies = [\"192.0.2.0/24\"]"), &[]).unwrap();
        assert!(l.config.trusted_proxies[0].contains(ip("192.0.2.77")));
        let e = load(None, &[("CHATBOX_TRUSTED_PROXIES", "10.0.0.0/33")]).unwrap_err();
        assert!(e.to_string().contains("CHATBOX_TRUSTED_PROXIES"), "{e}");
        let e = load(Some("trusted_proxies = [\"proxy.local\"]"), &[]).unwrap_err();
        assert!(e.to_string().contains("proxy.local"), "{e}");
    }
}
