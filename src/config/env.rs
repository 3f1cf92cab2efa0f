//! `CHATBOX_*` environment variables: one value parsed into a key's type, and the
//! variables that match no key (misspelt ones), reported as warnings.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::IntoDeserializer;
use serde::Deserialize;

use super::cidr::Cidr;
use super::keys::KEYS;
use super::models::{LlmSection, ModelConfig};
use super::{IoDriver, LlmProvider, LogFormat, SttProvider};

/// Variables of the process rather than of a configuration key.
const NOT_KEYS: &[&str] = &["CHATBOX_CONFIG"];
/// Variables the test suites and CI read (`CHATBOX_TEST_MONGO_URI`, ...).
const TEST_PREFIX: &str = "CHATBOX_TEST_";

/// Parses one environment value into a key's type.
pub(super) trait FromEnv: Sized {
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

/// Enumerations take the names the TOML file takes (serde's), so both agree.
macro_rules! from_env_via_serde {
    ($($t:ty),*) => {$(
        impl FromEnv for $t {
            fn from_env(value: &str) -> Result<Self, String> {
                let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                    value.trim().into_deserializer();
                <$t>::deserialize(de).map_err(|e| e.to_string())
            }
        }
    )*};
}
from_env_via_serde!(LlmProvider, IoDriver, LogFormat, SttProvider);

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

impl FromEnv for Cidr {
    fn from_env(value: &str) -> Result<Self, String> {
        value.parse()
    }
}

impl<T: FromEnv> FromEnv for Vec<T> {
    /// A comma-separated list; blanks around items are ignored.
    fn from_env(value: &str) -> Result<Self, String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(T::from_env)
            .collect()
    }
}

impl FromEnv for LlmSection {
    /// `CHATBOX_LLM_MODELS`: the `[[llm.models]]` list as a JSON array of objects
    /// or a TOML array of inline tables; empty for none.
    fn from_env(value: &str) -> Result<Self, String> {
        let text = value.trim();
        if text.is_empty() {
            return Ok(LlmSection::default());
        }
        let json = match serde_json::from_str::<Vec<ModelConfig>>(text) {
            Ok(models) => return Ok(LlmSection { models }),
            Err(e) => e,
        };
        // A TOML array is the value of `models` in the `[llm]` table.
        toml::from_str::<LlmSection>(&format!("models = {text}")).map_err(|toml| {
            format!(
                "expected a JSON array of model objects ({json}) or a TOML array of \
                 inline tables ({})",
                toml.message()
            )
        })
    }
}

/// A warning for every `CHATBOX_*` name that is no key: a misspelt variable would
/// otherwise be ignored in silence.
pub(super) fn unknown(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let known: Vec<String> = KEYS.iter().map(|k| k.env()).collect();
    names
        .into_iter()
        .filter(|n| {
            n.starts_with("CHATBOX_")
                && !n.starts_with(TEST_PREFIX)
                && !NOT_KEYS.contains(&n.as_str())
                && !known.contains(n)
        })
        .map(|n| {
            format!("unknown variable {n} ignored (misspelt? `chatbox --help` lists them all)")
        })
        .collect()
}
