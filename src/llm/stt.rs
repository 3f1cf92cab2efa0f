//! Speech-to-text for voice messages: an OpenAI-compatible
//! `POST {stt_base_url}/v1/audio/transcriptions` (OpenAI, faster-whisper and
//! whisper.cpp servers speak it), or the offline `demo`.
//!
//! A transcription runs on the blocking pool's runtime (reqwest lives there),
//! never on a core. The audio's length is checked against `voice_seconds_max`
//! where its container states it, before anything is sent. Failures that may
//! pass (429, 5xx, a timeout, a broken connection) are retried with the chat
//! providers' backoff ([`super::retry`]); anything else fails at once.

use std::time::Duration;

use bytes::Bytes;

use super::audio;
use super::retry::{backoff, retry_after, status_kind};
use super::ErrorKind;
use crate::config::{Config, SttProvider};
use crate::pool::BlockingPool;

/// The provider's answer is JSON with one short text: anything larger is wrong.
const RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Longest error body kept for the log and the message.
const ERROR_BODY_BYTES_MAX: usize = 512;
/// Longest transcript kept (a five-minute voice note is a few thousand bytes).
pub const TRANSCRIPT_BYTES_MAX: usize = 32 * 1024;
const OPENAI_BASE: &str = "https://api.openai.com";

/// The audio of a voice message, as uploaded.
#[derive(Debug, Clone)]
pub struct Audio {
    pub bytes: Bytes,
    /// As decided from the content at upload.
    pub mime: String,
    /// The uploader's display name, if any.
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SttError {
    #[error("the voice message is {seconds} s long; at most {max} s are transcribed")]
    TooLong { seconds: u64, max: u64 },
    #[error("no speech was recognised in the voice message")]
    Empty,
    #[error("the transcription service failed ({}): {detail}", kind.label())]
    Failed {
        kind: ErrorKind,
        detail: String,
        retries: u32,
    },
}

/// A configured speech-to-text provider. Its `Debug` leaves the key out.
pub struct Stt {
    provider: SttProvider,
    endpoint: String,
    api_key: Option<String>,
    model: String,
    timeout: Duration,
    max_retries: u32,
    seconds_max: u64,
    client: Option<reqwest::Client>,
}

impl std::fmt::Debug for Stt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stt")
            .field("provider", &self.provider)
            .field("endpoint", &self.endpoint)
            .field("api_key", &crate::secret::Redacted(&self.api_key))
            .field("model", &self.model)
            .field("seconds_max", &self.seconds_max)
            .finish_non_exhaustive()
    }
}

/// `{base}/v1/audio/transcriptions`; a base that already ends in `/v1` (as
/// `llm_base_url` values do) is not given a second one.
pub fn endpoint(base: Option<&str>) -> String {
    let base = base.unwrap_or(OPENAI_BASE).trim_end_matches('/');
    match base.ends_with("/v1") {
        true => format!("{base}/audio/transcriptions"),
        false => format!("{base}/v1/audio/transcriptions"),
    }
}

/// Problems with the speech-to-text keys, for `crate::check_config`.
pub fn validate(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if cfg.stt_provider == SttProvider::Openai {
        if let Err(e) = crate::outbound::check_endpoint(&endpoint(cfg.stt_base_url.as_deref())) {
            problems.push(format!("CHATBOX_STT_BASE_URL {e}"));
        }
    }
    if cfg.stt_model.trim().is_empty() || cfg.stt_model.contains(['\r', '\n']) {
        problems.push("CHATBOX_STT_MODEL must be a model name such as whisper-1".into());
    }
    problems
}

impl Stt {
    /// Builds the HTTP client inside the blocking pool's runtime, as the chat
    /// providers do.
    pub fn new(cfg: &Config, pool: &BlockingPool) -> Result<Stt, String> {
        let _rt = pool.enter();
        let client = match cfg.stt_provider {
            SttProvider::Demo => None,
            SttProvider::Openai => Some(
                super::provider_client(Duration::from_millis(cfg.stt_timeout_ms.min(10_000)))
                    .map_err(|e| format!("speech-to-text: cannot build an HTTP client: {e}"))?,
            ),
        };
        Ok(Stt {
            provider: cfg.stt_provider,
            endpoint: endpoint(cfg.stt_base_url.as_deref()),
            api_key: cfg.stt_api_key.clone(),
            model: cfg.stt_model.clone(),
            timeout: Duration::from_millis(cfg.stt_timeout_ms),
            max_retries: cfg.stt_max_retries,
            seconds_max: cfg.voice_seconds_max,
            client,
        })
    }

    /// The audio's length first, then the transcript. Runs on the pool's runtime.
    pub async fn transcribe(&self, audio: &Audio) -> Result<String, SttError> {
        let ms = audio::duration_ms(&audio.bytes);
        if let Some(ms) = ms.filter(|ms| *ms > self.seconds_max * 1000) {
            return Err(SttError::TooLong {
                seconds: ms.div_ceil(1000),
                max: self.seconds_max,
            });
        }
        let text = match (&self.client, self.provider) {
            (Some(client), SttProvider::Openai) => self.remote(client, audio).await?,
            _ => demo(audio, ms),
        };
        let text = clip(text.trim(), TRANSCRIPT_BYTES_MAX);
        match text.is_empty() {
            true => Err(SttError::Empty),
            false => Ok(text.to_owned()),
        }
    }

    /// Attempts with backoff while the failure may pass.
    async fn remote(&self, client: &reqwest::Client, audio: &Audio) -> Result<String, SttError> {
        let boundary = format!("chatbox-{}", crate::clock::new_id("stt"));
        let body = Bytes::from(form(&self.model, audio, &boundary));
        let mut retries = 0u32;
        loop {
            match self.attempt(client, body.clone(), &boundary).await {
                Ok(text) => return Ok(text),
                Err(e) if e.kind.retryable() && retries < self.max_retries => {
                    tracing::info!(kind = e.kind.label(), detail = %e.detail, attempt = retries, "retrying the transcription");
                    tokio::time::sleep(backoff(retries, e.retry_after)).await;
                    retries += 1;
                }
                Err(e) => {
                    tracing::warn!(kind = e.kind.label(), detail = %e.detail, retries, "transcription failed");
                    return Err(SttError::Failed {
                        kind: e.kind,
                        detail: e.detail,
                        retries,
                    });
                }
            }
        }
    }

    /// One request, cut off at the timeout.
    async fn attempt(
        &self,
        client: &reqwest::Client,
        body: Bytes,
        boundary: &str,
    ) -> Result<String, Attempt> {
        let mut req = client
            .post(&self.endpoint)
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        if let Some(ctx) = crate::trace::current() {
            req = req.header("traceparent", ctx.child().traceparent());
        }
        let work = async {
            let resp = req.send().await.map_err(|e| {
                Attempt::transcribe(ErrorKind::Connect, crate::outbound::error_text(e))
            })?;
            let (status, wait) = (resp.status(), retry_after(resp.headers()));
            let body = read_bounded(resp).await?;
            if !status.is_success() {
                let shown = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_BYTES_MAX)]);
                let mut e =
                    Attempt::transcribe(status_kind(status), format!("HTTP {status}: {shown}"));
                e.retry_after = wait;
                return Err(e);
            }
            parse_text(&body).map_err(|d| Attempt::transcribe(ErrorKind::Provider, d))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Attempt::transcribe(
                ErrorKind::Timeout,
                format!("no transcript within {} ms", self.timeout.as_millis()),
            )),
        }
    }
}

/// Why one attempt failed: the chat providers' kind (a transcript is never half
/// sent, so never `sent_text`).
type Attempt = super::AttemptError;

/// The response body, refused past [`RESPONSE_BYTES_MAX`].
async fn read_bounded(mut resp: reqwest::Response) -> Result<Vec<u8>, Attempt> {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) if body.len() + c.len() > RESPONSE_BYTES_MAX => {
                return Err(Attempt::transcribe(
                    ErrorKind::TooLarge,
                    "the answer is larger than a transcript can be",
                ))
            }
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) => return Ok(body),
            Err(e) => {
                let detail = format!("the answer broke off: {}", crate::outbound::error_text(e));
                return Err(Attempt::transcribe(ErrorKind::StreamEnded, detail));
            }
        }
    }
}

/// `{"text": "..."}`, the transcription API's JSON answer.
fn parse_text(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        text: String,
    }
    serde_json::from_slice::<Answer>(body)
        .map(|a| a.text)
        .map_err(|e| format!("the answer is not a transcript ({{\"text\": ...}}): {e}"))
}

/// The name the audio is sent under: the display name when it carries the
/// type's extension, else `voice.<ext>` (the API reads the format from it).
/// Characters that could break the part's header are replaced.
pub fn part_name(audio: &Audio) -> String {
    let ext = audio::extension(&audio.mime);
    let given = audio.name.as_deref().filter(|n| {
        n.rsplit_once('.')
            .is_some_and(|(stem, e)| !stem.is_empty() && e.eq_ignore_ascii_case(ext))
    });
    match given {
        Some(n) => n
            .chars()
            .map(|c| match c {
                '"' | '\\' | '\r' | '\n' => '_',
                c if c.is_control() => '_',
                c => c,
            })
            .collect(),
        None => format!("voice.{ext}"),
    }
}

/// The multipart body: the `model` field, then the audio as the `file` part.
pub fn form(model: &str, audio: &Audio, boundary: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(audio.bytes.len() + 512);
    b.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\
             Content-Type: {}\r\n\r\n",
            part_name(audio),
            audio.mime
        )
        .as_bytes(),
    );
    b.extend_from_slice(&audio.bytes);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b
}

/// The offline provider: says what it heard, the same way every time.
fn demo(audio: &Audio, ms: Option<u64>) -> String {
    let kib = (audio.bytes.len() as u64).div_ceil(1024);
    let length = match ms {
        Some(ms) => format!("{}.{} seconds", ms / 1000, ms % 1000 / 100),
        None => "unknown length".into(),
    };
    format!(
        "(demo transcript) A voice message of {length}, {kib} KiB of {}.",
        audio.mime
    )
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audio(name: Option<&str>, mime: &str, bytes: &'static [u8]) -> Audio {
        Audio {
            bytes: Bytes::from_static(bytes),
            mime: mime.into(),
            name: name.map(str::to_owned),
        }
    }

    #[test]
    fn endpoints_get_one_v1() {
        assert_eq!(
            endpoint(None),
            "https://api.openai.com/v1/audio/transcriptions"
        );
        assert_eq!(
            endpoint(Some("http://127.0.0.1:9000/")),
            "http://127.0.0.1:9000/v1/audio/transcriptions"
        );
        assert_eq!(
            endpoint(Some("https://w.example/v1")),
            "https://w.example/v1/audio/transcriptions"
        );
    }

    #[test]
    fn base_urls_are_https_except_loopback_and_keys_stay_secret() {
        let mut cfg = Config {
            stt_provider: SttProvider::Openai,
            stt_base_url: Some("http://10.0.0.1:9000".into()),
            stt_api_key: Some("sk-very-secret".into()),
            ..Config::default()
        };
        assert_eq!(validate(&cfg).len(), 1, "{:?}", validate(&cfg));
        cfg.stt_base_url = Some("http://127.0.0.1:9000".into());
        assert!(validate(&cfg).is_empty());
        assert!(!format!("{cfg:?}").contains("sk-very-secret"));
        cfg.stt_model = " ".into();
        assert_eq!(validate(&cfg).len(), 1);
    }

    #[test]
    fn the_form_carries_the_model_and_the_exact_bytes() {
        let a = audio(Some("note \"1\".wav"), "audio/x-wav", b"RIFF\0\x01\xff");
        let body = form("whisper-1", &a, "BB");
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("--BB\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--BB\r\n"), "{text}");
        assert!(
            text.contains(
                "name=\"file\"; filename=\"note _1_.wav\"\r\nContent-Type: audio/x-wav\r\n\r\n"
            ),
            "{text}"
        );
        assert!(body.windows(7).any(|w| w == b"RIFF\0\x01\xff"));
        assert!(text.ends_with("\r\n--BB--\r\n"));
        assert_eq!(part_name(&audio(None, "audio/ogg", b"")), "voice.ogg");
        assert_eq!(
            part_name(&audio(Some("x.png"), "audio/mpeg", b"")),
            "voice.mp3"
        );
        assert_eq!(
            part_name(&audio(Some(".wav"), "audio/x-wav", b"")),
            "voice.wav"
        );
    }

    #[test]
    fn answers_are_parsed_or_refused() {
        assert_eq!(
            parse_text(br#"{"text":"hello there"}"#).unwrap(),
            "hello there"
        );
        assert!(parse_text(b"<html>oops</html>").is_err());
        assert!(parse_text(br#"{"transcript":"x"}"#).is_err());
        assert_eq!(clip("héllo", 2), "h");
    }

    #[test]
    fn the_demo_says_what_it_heard_without_a_network() {
        let (rt, pool) = crate::pool::PoolRuntime::start(1, 4).unwrap();
        let cfg = Config {
            voice_seconds_max: 2,
            ..Config::default()
        };
        let stt = Stt::new(&cfg, &pool).unwrap();
        assert!(format!("{stt:?}").contains("Demo"));
        let wav = Bytes::from(super::super::audio::tests_support::wav(1500));
        let a = Audio {
            bytes: wav.clone(),
            mime: "audio/x-wav".into(),
            name: None,
        };
        let run = |a: Audio| {
            let stt = Stt::new(&cfg, &pool).unwrap();
            pool.block_on(async move { stt.transcribe(&a).await.map_err(|e| e.to_string()) })
                .unwrap()
        };
        let text = run(a.clone()).unwrap();
        assert_eq!(text, run(a).unwrap(), "deterministic");
        assert!(
            text.contains("1.5 seconds") && text.contains("audio/x-wav"),
            "{text}"
        );
        let long = Audio {
            bytes: Bytes::from(super::super::audio::tests_support::wav(2500)),
            mime: "audio/x-wav".into(),
            name: None,
        };
        let refused = run(long).unwrap_err();
        assert!(refused.contains("3 s long; at most 2 s"), "{refused}");
        rt.shutdown_background();
    }
}
