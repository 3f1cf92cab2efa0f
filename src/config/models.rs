//! The `[[llm.models]]` list: plain data, so that configuration needs nothing from
//! the `llm` module (which builds clients from it and checks it at start-up).

use serde::{Deserialize, Serialize};

use super::LlmProvider;

/// One model as configured in `[[llm.models]]`. Its `Debug` redacts the API key.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use as `model_id`.
    pub id: String,
    pub provider: LlmProvider,
    /// API base, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:11434/v1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Read the key from this environment variable instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// The provider's model name; defaults to `id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "defaults::first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    #[serde(default = "defaults::total_timeout_ms")]
    pub total_timeout_ms: u64,
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens: u32,
    /// Another model's `id`, tried when this one fails before its first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

impl ModelConfig {
    /// A model with the documented defaults.
    pub fn new(id: &str, provider: LlmProvider) -> ModelConfig {
        ModelConfig {
            id: id.to_owned(),
            provider,
            base_url: None,
            api_key: None,
            api_key_env: None,
            model: None,
            connect_timeout_ms: defaults::connect_timeout_ms(),
            first_token_timeout_ms: defaults::first_token_timeout_ms(),
            total_timeout_ms: defaults::total_timeout_ms(),
            max_retries: defaults::max_retries(),
            max_tokens: defaults::max_tokens(),
            fallback: None,
        }
    }
}

impl std::fmt::Debug for ModelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelConfig")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field("api_key", &crate::secret::Redacted(&self.api_key))
            .field("api_key_env", &self.api_key_env)
            .field("model", &self.model)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("first_token_timeout_ms", &self.first_token_timeout_ms)
            .field("total_timeout_ms", &self.total_timeout_ms)
            .field("max_retries", &self.max_retries)
            .field("max_tokens", &self.max_tokens)
            .field("fallback", &self.fallback)
            .finish()
    }
}

mod defaults {
    pub fn connect_timeout_ms() -> u64 {
        5_000
    }
    pub fn first_token_timeout_ms() -> u64 {
        30_000
    }
    pub fn total_timeout_ms() -> u64 {
        180_000
    }
    pub fn max_retries() -> u32 {
        2
    }
    pub fn max_tokens() -> u32 {
        1024
    }
}

/// The `[llm]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmSection {
    pub models: Vec<ModelConfig>,
}
