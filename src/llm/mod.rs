//! Language-model providers behind one cancellable stream of events.
//!
//! Remote providers (OpenAI-compatible, Anthropic) run as tokio tasks on the
//! blocking pool with reqwest and hand events to the owning core over a bounded
//! channel; the core never blocks. Aborting the stream (cancel, or the user gone
//! past the grace period) drops the task and with it the upstream connection at
//! once. Retries with jittered backoff happen only before the first chunk, since
//! after it the user has already seen text; then the fallback model, if any.

pub mod anthropic;
pub mod audio;
pub mod demo;
pub mod openai;
pub mod retry;
pub mod sse;
pub mod stt;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, LlmProvider};
// The model list is plain configuration data; it lives in `config`, which
// depends on nothing else, and is re-exported here where it is used.
pub use crate::config::{LlmSection, ModelConfig};
use crate::pool::BlockingPool;
use retry::{backoff, retry_after, status_kind};

/// Events the stream's channel holds before the provider task waits for the core.
const STREAM_QUEUE_EVENTS: usize = 64;
/// Longest error body kept for the log.
const ERROR_BODY_BYTES_MAX: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnRole {
    User,
    Assistant,
}

impl TurnRole {
    pub fn wire(self) -> &'static str {
        match self {
            TurnRole::User => "user",
            TurnRole::Assistant => "assistant",
        }
    }
}

/// One message of the conversation sent upstream.
#[derive(Debug, Clone)]
pub struct Turn {
    pub role: TurnRole,
    pub text: Arc<str>,
}

/// Longest model id a client may name (`model_id`) or a configuration may declare.
pub const MODEL_ID_CHARS_MAX: usize = 64;

// The metrics' labels follow the kinds one to one.
const _: () = assert!(ErrorKind::ALL.len() == crate::metrics::LLM_ERROR_LABELS.len());

/// What a provider event means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Usage {
        input: Option<u64>,
        output: Option<u64>,
    },
    Done,
}

/// A remote provider's wire format: how to ask for a streamed answer, and what
/// each server-sent event means. One implementation per API family.
pub trait Provider: Send + Sync {
    /// The streaming request for `turns`, with the system prompt.
    fn request(
        &self,
        client: &reqwest::Client,
        spec: &ModelSpec,
        system: &str,
        turns: &[Turn],
    ) -> reqwest::RequestBuilder;
    /// The meaning of one event; an error starting with "provider error" is the
    /// provider reporting a failure, any other error a malformed event.
    fn interpret(&self, event: &sse::Event) -> Result<Vec<Piece>, String>;
}

/// OpenAI-compatible chat completions (also Ollama, vLLM, llama.cpp).
pub struct OpenAi;
/// Anthropic's messages API.
pub struct Anthropic;

impl Provider for OpenAi {
    fn request(
        &self,
        client: &reqwest::Client,
        spec: &ModelSpec,
        system: &str,
        turns: &[Turn],
    ) -> reqwest::RequestBuilder {
        let r = client
            .post(format!("{}/chat/completions", spec.base_url))
            .json(&openai::body(
                &spec.upstream_model,
                system,
                turns,
                spec.max_tokens,
            ));
        match &spec.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }
    fn interpret(&self, event: &sse::Event) -> Result<Vec<Piece>, String> {
        openai::interpret(&event.data)
    }
}

impl Provider for Anthropic {
    fn request(
        &self,
        client: &reqwest::Client,
        spec: &ModelSpec,
        system: &str,
        turns: &[Turn],
    ) -> reqwest::RequestBuilder {
        let r = client
            .post(format!("{}/messages", spec.base_url))
            .header("anthropic-version", anthropic::API_VERSION)
            .json(&anthropic::body(
                &spec.upstream_model,
                system,
                turns,
                spec.max_tokens,
            ));
        match &spec.api_key {
            Some(k) => r.header("x-api-key", k),
            None => r,
        }
    }
    fn interpret(&self, event: &sse::Event) -> Result<Vec<Piece>, String> {
        anthropic::interpret(&event.name, &event.data)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    RateLimited,
    ServerError,
    ClientError,
    Provider,
    StreamEnded,
    /// An event larger than `llm_event_bytes_max`.
    TooLarge,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::RateLimited,
        ErrorKind::ServerError,
        ErrorKind::ClientError,
        ErrorKind::Provider,
        ErrorKind::StreamEnded,
        ErrorKind::TooLarge,
    ];
    /// Its position in [`crate::metrics::LLM_ERROR_LABELS`] (and in `ALL`).
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn label(self) -> &'static str {
        crate::metrics::LLM_ERROR_LABELS[self.index()]
    }
    pub(crate) fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Connect
                | ErrorKind::Timeout
                | ErrorKind::RateLimited
                | ErrorKind::ServerError
        )
    }
}

/// What the core receives from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmEvent {
    Chunk(String),
    Done {
        input_tokens: u64,
        output_tokens: u64,
        retries: u32,
        malformed: u32,
    },
    Failed {
        kind: ErrorKind,
        detail: String,
        retries: u32,
    },
}

/// A model ready to use. Its `Debug` leaves the API key out.
pub struct ModelSpec {
    pub id: String,
    pub provider: LlmProvider,
    base_url: String,
    api_key: Option<String>,
    upstream_model: String,
    first_token_timeout: Duration,
    total_timeout: Duration,
    max_retries: u32,
    max_tokens: u32,
    fallback: Option<String>,
    client: Option<reqwest::Client>,
}

impl std::fmt::Debug for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSpec")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field("api_key", &crate::secret::Redacted(&self.api_key))
            .field("upstream_model", &self.upstream_model)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("total_timeout", &self.total_timeout)
            .field("max_retries", &self.max_retries)
            .field("max_tokens", &self.max_tokens)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl ModelSpec {
    /// The wire format of this model's provider (remote models only).
    fn wire(&self) -> &'static dyn Provider {
        match self.provider {
            LlmProvider::Anthropic => &Anthropic,
            _ => &OpenAi,
        }
    }
}

/// Every configured model; built once at start-up.
pub struct Models {
    specs: HashMap<String, Arc<ModelSpec>>,
    order: Vec<String>,
    pub system_prompt: String,
    /// `llm_event_bytes_max`: the bound of one upstream event.
    event_bytes_max: usize,
}

/// The configured models: `[[llm.models]]`, or the single model of
/// `CHATBOX_LLM_PROVIDER` / `_BASE_URL` / `_API_KEY` / `_MODEL`.
pub fn model_configs(cfg: &Config) -> Vec<ModelConfig> {
    if !cfg.llm.models.is_empty() {
        return cfg.llm.models.clone();
    }
    let id = cfg.llm_model.clone().unwrap_or_else(|| {
        match cfg.llm_provider {
            LlmProvider::Demo => "demo",
            LlmProvider::Openai => "gpt-4o-mini",
            LlmProvider::Anthropic => "claude-3-5-haiku-latest",
        }
        .to_owned()
    });
    let mut m = ModelConfig::new(&id, cfg.llm_provider);
    m.base_url = cfg.llm_base_url.clone();
    m.api_key = cfg.llm_api_key.clone();
    vec![m]
}

/// Problems with the model list, for `crate::check_config`.
pub fn validate(cfg: &Config) -> Vec<String> {
    let models = model_configs(cfg);
    let mut errs = Vec::new();
    let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    for (i, m) in models.iter().enumerate() {
        if m.id.is_empty() || m.id.chars().count() > MODEL_ID_CHARS_MAX {
            errs.push(format!("llm model id {:?} must be 1..=64 characters", m.id));
        }
        if ids[..i].contains(&m.id.as_str()) {
            errs.push(format!("llm model id {:?} appears twice", m.id));
        }
        if let Some(f) = &m.fallback {
            if f == &m.id || !ids.contains(&f.as_str()) {
                errs.push(format!(
                    "llm model {:?}: fallback {f:?} must be another configured model",
                    m.id
                ));
            }
        }
        if m.provider != LlmProvider::Demo {
            if let Err(e) = crate::outbound::check_endpoint(&base_url(m)) {
                errs.push(format!("llm model {:?}: base_url {e}", m.id));
            }
        }
        // The server reads it at start and refuses to start without it: say so now.
        if let (None, Some(var)) = (&m.api_key, &m.api_key_env) {
            if std::env::var_os(var).is_none() {
                errs.push(format!(
                    "llm model {:?}: api_key_env names {var}, which is not set",
                    m.id
                ));
            }
        }
        if m.first_token_timeout_ms == 0 || m.total_timeout_ms < m.first_token_timeout_ms {
            errs.push(format!(
                "llm model {:?}: need 0 < first_token_timeout_ms <= total_timeout_ms",
                m.id
            ));
        }
    }
    errs
}

fn base_url(m: &ModelConfig) -> String {
    m.base_url.clone().unwrap_or_else(|| {
        match m.provider {
            LlmProvider::Openai => "https://api.openai.com/v1",
            LlmProvider::Anthropic => "https://api.anthropic.com/v1",
            LlmProvider::Demo => "",
        }
        .to_owned()
    })
}

impl Models {
    /// Builds every model's HTTP client inside the blocking pool's runtime.
    pub fn new(cfg: &Config, pool: &BlockingPool) -> Result<Models, String> {
        let _rt = pool.enter();
        let mut specs = HashMap::new();
        let mut order = Vec::new();
        for m in model_configs(cfg) {
            let api_key = match (&m.api_key, &m.api_key_env) {
                (Some(k), _) => Some(k.clone()),
                (None, Some(var)) => Some(
                    std::env::var(var)
                        .map_err(|_| format!("llm model {:?}: {var} is not set", m.id))?,
                ),
                (None, None) => None,
            };
            let client = match m.provider {
                LlmProvider::Demo => None,
                _ => Some(
                    provider_client(Duration::from_millis(m.connect_timeout_ms)).map_err(|e| {
                        format!("llm model {:?}: cannot build an HTTP client: {e}", m.id)
                    })?,
                ),
            };
            order.push(m.id.clone());
            specs.insert(
                m.id.clone(),
                Arc::new(ModelSpec {
                    base_url: base_url(&m).trim_end_matches('/').to_owned(),
                    upstream_model: m.model.clone().unwrap_or_else(|| m.id.clone()),
                    id: m.id,
                    provider: m.provider,
                    api_key,
                    first_token_timeout: Duration::from_millis(m.first_token_timeout_ms),
                    total_timeout: Duration::from_millis(m.total_timeout_ms),
                    max_retries: m.max_retries,
                    max_tokens: m.max_tokens,
                    fallback: m.fallback,
                    client,
                }),
            );
        }
        Ok(Models {
            specs,
            order,
            system_prompt: cfg.llm_system_prompt.clone(),
            event_bytes_max: cfg.llm_event_bytes_max,
        })
    }

    /// The configured model ids, the default first.
    pub fn ids(&self) -> &[String] {
        &self.order
    }

    /// The model a client asked for, or the default (the first configured).
    pub fn pick(&self, id: Option<&str>) -> Result<Arc<ModelSpec>, String> {
        let id = id.unwrap_or(&self.order[0]);
        self.specs
            .get(id)
            .cloned()
            .ok_or_else(|| format!("unknown model_id; available: {}", self.order.join(", ")))
    }
}

/// Token usage estimated from text when a provider reports none.
pub fn estimate_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The prompt's tokens, estimated: the conversation and the system prompt.
fn estimate_prompt(turns: &[Turn], system: &str) -> u64 {
    turns.iter().map(|t| estimate_tokens(&t.text)).sum::<u64>() + estimate_tokens(system)
}

/// A running answer. Dropping it aborts the upstream request.
pub struct LlmStream {
    inner: Inner,
}

enum Inner {
    Demo {
        chunks: VecDeque<String>,
        delay: Duration,
        input_tokens: u64,
        output_tokens: u64,
        done: bool,
    },
    Remote {
        rx: async_channel::Receiver<LlmEvent>,
        task: Option<tokio::task::AbortHandle>,
    },
    Failed(Option<LlmEvent>),
}

impl LlmStream {
    /// Starts `spec` on the conversation `turns` (oldest first).
    pub fn start(
        models: &Arc<Models>,
        pool: &BlockingPool,
        spec: Arc<ModelSpec>,
        turns: Vec<Turn>,
        demo_delay: Duration,
    ) -> LlmStream {
        if spec.provider == LlmProvider::Demo {
            let last_user = turns
                .iter()
                .rev()
                .find(|t| t.role == TurnRole::User)
                .map_or("", |t| &*t.text);
            return LlmStream {
                inner: Inner::Demo {
                    chunks: demo::answer(last_user).into(),
                    delay: demo_delay,
                    // The demo sends no system prompt anywhere.
                    input_tokens: estimate_prompt(&turns, ""),
                    output_tokens: 0,
                    done: false,
                },
            };
        }
        let (tx, rx) = async_channel::bounded(STREAM_QUEUE_EVENTS);
        // The request's trace (logs on the pool, `traceparent` upstream) goes along.
        let task = pool.spawn(crate::trace::Traced::inherit(run(
            models.clone(),
            spec,
            turns,
            tx,
        )));
        match task {
            Ok(handle) => LlmStream {
                inner: Inner::Remote {
                    rx,
                    task: Some(handle),
                },
            },
            Err(e) => LlmStream {
                inner: Inner::Failed(Some(LlmEvent::Failed {
                    kind: ErrorKind::Connect,
                    detail: e.to_string(),
                    retries: 0,
                })),
            },
        }
    }

    /// The next event; `None` once the stream has ended. Cancel-safe.
    pub async fn next(&mut self) -> Option<LlmEvent> {
        match &mut self.inner {
            Inner::Demo {
                chunks,
                delay,
                input_tokens,
                output_tokens,
                done,
            } => {
                if *done {
                    return None;
                }
                demo::pace(*delay).await;
                match chunks.pop_front() {
                    Some(c) => {
                        *output_tokens += 1;
                        Some(LlmEvent::Chunk(c))
                    }
                    None => {
                        *done = true;
                        Some(LlmEvent::Done {
                            input_tokens: *input_tokens,
                            output_tokens: *output_tokens,
                            retries: 0,
                            malformed: 0,
                        })
                    }
                }
            }
            Inner::Remote { rx, .. } => rx.recv().await.ok(),
            Inner::Failed(ev) => ev.take(),
        }
    }

    /// Drops the upstream request now.
    pub fn abort(&mut self) {
        if let Inner::Remote { task, rx } = &mut self.inner {
            if let Some(t) = task.take() {
                t.abort();
            }
            rx.close();
        }
    }
}

impl Drop for LlmStream {
    fn drop(&mut self) {
        self.abort();
    }
}

/// The HTTP client of a model provider (chat or speech-to-text): the outbound
/// policy, a connect timeout, and chatbox's user agent.
fn provider_client(connect: Duration) -> reqwest::Result<reqwest::Client> {
    crate::outbound::client_builder()
        .connect_timeout(connect)
        .user_agent(concat!("chatbox/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Why one attempt at a provider failed.
struct AttemptError {
    kind: ErrorKind,
    detail: String,
    retry_after: Option<Duration>,
    /// Text reached the user: no retry, no fallback.
    sent_text: bool,
}

impl AttemptError {
    fn new(kind: ErrorKind, detail: impl Into<String>, sent_text: bool) -> AttemptError {
        AttemptError {
            kind,
            detail: detail.into(),
            retry_after: None,
            sent_text,
        }
    }

    /// A speech-to-text attempt's failure (nothing reached the user).
    fn transcribe(kind: ErrorKind, detail: impl Into<String>) -> AttemptError {
        AttemptError::new(kind, detail, false)
    }
}

/// The provider task: retries, then the fallback chain, then a `Failed` event.
async fn run(
    models: Arc<Models>,
    mut spec: Arc<ModelSpec>,
    turns: Vec<Turn>,
    tx: async_channel::Sender<LlmEvent>,
) {
    let mut retries = 0u32;
    let mut tried = vec![spec.id.clone()];
    loop {
        let mut attempt = 0u32;
        let err = loop {
            match attempt_once(&models, &spec, &turns, &tx, retries).await {
                Ok(()) => return,
                Err(e) if !e.sent_text && e.kind.retryable() && attempt < spec.max_retries => {
                    tokio::time::sleep(backoff(attempt, e.retry_after)).await;
                    attempt += 1;
                    retries += 1;
                    tracing::info!(model = %spec.id, kind = e.kind.label(), detail = %e.detail, attempt, "retrying the LLM request");
                }
                Err(e) => break e,
            }
        };
        tracing::warn!(model = %spec.id, kind = err.kind.label(), detail = %err.detail, "LLM request failed");
        let next = spec
            .fallback
            .as_ref()
            .filter(|f| !tried.contains(f))
            .and_then(|f| models.specs.get(f));
        match next {
            Some(fb) if !err.sent_text => {
                tracing::info!(from = %spec.id, to = %fb.id, "trying the fallback model");
                spec = fb.clone();
                tried.push(spec.id.clone());
            }
            _ => {
                let _ = tx
                    .send(LlmEvent::Failed {
                        kind: err.kind,
                        detail: err.detail,
                        retries,
                    })
                    .await;
                return;
            }
        }
    }
}

/// When an attempt must have its first token, and when its last.
struct Deadlines {
    first: tokio::time::Instant,
    total: tokio::time::Instant,
}

/// One request to the provider, relayed to `tx` as it streams.
async fn attempt_once(
    models: &Models,
    spec: &ModelSpec,
    turns: &[Turn],
    tx: &async_channel::Sender<LlmEvent>,
    retries: u32,
) -> Result<(), AttemptError> {
    let start = tokio::time::Instant::now();
    let deadlines = Deadlines {
        first: start + spec.first_token_timeout,
        total: start + spec.total_timeout,
    };
    let resp = open_stream(models, spec, turns, &deadlines).await?;
    let Some(got) = relay_stream(spec, models.event_bytes_max, resp, tx, &deadlines).await? else {
        return Ok(()); // nobody listens any more: the request was dropped
    };
    let _ = tx
        .send(LlmEvent::Done {
            // Providers that report no usage get an estimate from the text sent.
            input_tokens: got
                .input
                .unwrap_or_else(|| estimate_prompt(turns, &models.system_prompt)),
            output_tokens: got.output.unwrap_or(got.chunks),
            retries,
            malformed: got.malformed,
        })
        .await;
    Ok(())
}

/// Sends the request and waits for a successful status; an error status becomes
/// the attempt's error with (a bounded part of) its body.
async fn open_stream(
    models: &Models,
    spec: &ModelSpec,
    turns: &[Turn],
    deadlines: &Deadlines,
) -> Result<reqwest::Response, AttemptError> {
    let Some(client) = spec.client.as_ref() else {
        return Err(AttemptError::new(
            ErrorKind::Connect,
            "no HTTP client for this model",
            false,
        ));
    };
    let first_deadline = deadlines.first;
    let mut request = spec
        .wire()
        .request(client, spec, &models.system_prompt, turns);
    if let Some(ctx) = crate::trace::current() {
        request = request.header("traceparent", ctx.child().traceparent());
    }
    let mut resp = match tokio::time::timeout_at(first_deadline, request.send()).await {
        Err(_) => {
            return Err(AttemptError::new(
                ErrorKind::Timeout,
                "no response before the first-token deadline",
                false,
            ))
        }
        Ok(Err(e)) => {
            return Err(AttemptError::new(
                ErrorKind::Connect,
                format!("request failed: {e}"),
                false,
            ))
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if !status.is_success() {
        let retry_after = retry_after(resp.headers());
        let mut body = Vec::new();
        while let Ok(Ok(Some(c))) = tokio::time::timeout_at(first_deadline, resp.chunk()).await {
            body.extend_from_slice(&c);
            if body.len() >= ERROR_BODY_BYTES_MAX {
                break;
            }
        }
        body.truncate(ERROR_BODY_BYTES_MAX);
        let kind = status_kind(status);
        let detail = format!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        return Err(AttemptError {
            kind,
            detail,
            retry_after,
            sent_text: false,
        });
    }
    Ok(resp)
}

/// What a relayed stream reported and sent.
#[derive(Default)]
struct Relayed {
    input: Option<u64>,
    output: Option<u64>,
    chunks: u64,
    malformed: u32,
}

/// Parses the event stream and relays its text; returns what it reported, or
/// `None` once nobody listens.
async fn relay_stream(
    spec: &ModelSpec,
    event_bytes_max: usize,
    mut resp: reqwest::Response,
    tx: &async_channel::Sender<LlmEvent>,
    deadlines: &Deadlines,
) -> Result<Option<Relayed>, AttemptError> {
    let wire = spec.wire();
    let mut parser = sse::Parser::new(event_bytes_max);
    let mut got = Relayed::default();
    loop {
        let sent_text = got.chunks > 0;
        // Before the first token its own deadline applies, after it only the total.
        let deadline = match sent_text {
            true => deadlines.total,
            false => deadlines.first.min(deadlines.total),
        };
        let bytes = next_bytes(&mut resp, deadline, sent_text).await?;
        let events = parser
            .feed(&bytes)
            .map_err(|e| AttemptError::new(ErrorKind::TooLarge, e.to_string(), sent_text))?;
        for ev in events {
            let pieces = match wire.interpret(&ev) {
                Ok(p) => p,
                Err(detail) if detail.starts_with("provider error") => {
                    return Err(AttemptError::new(ErrorKind::Provider, detail, sent_text))
                }
                Err(detail) => {
                    // One malformed event is skipped, not fatal; it is counted and logged.
                    got.malformed += 1;
                    tracing::warn!(model = %spec.id, %detail, "skipped a malformed provider event");
                    continue;
                }
            };
            for p in pieces {
                match p {
                    Piece::Text(t) => {
                        got.chunks += 1;
                        if tx.send(LlmEvent::Chunk(t)).await.is_err() {
                            return Ok(None);
                        }
                    }
                    Piece::Usage { input, output } => {
                        got.input = input.or(got.input);
                        got.output = output.or(got.output);
                    }
                    Piece::Done => return Ok(Some(got)),
                }
            }
        }
    }
}

/// The next bytes of the stream, or why there are none by `deadline`.
async fn next_bytes(
    resp: &mut reqwest::Response,
    deadline: tokio::time::Instant,
    sent_text: bool,
) -> Result<bytes::Bytes, AttemptError> {
    let fail = |kind, detail: String| Err(AttemptError::new(kind, detail, sent_text));
    match tokio::time::timeout_at(deadline, resp.chunk()).await {
        Err(_) => fail(ErrorKind::Timeout, "the stream stalled".into()),
        Ok(Err(e)) => fail(ErrorKind::StreamEnded, format!("stream broke: {e}")),
        Ok(Ok(None)) => fail(
            ErrorKind::StreamEnded,
            "stream ended before completion".into(),
        ),
        Ok(Ok(Some(b))) => Ok(b),
    }
}

#[cfg(test)]
mod tests;
