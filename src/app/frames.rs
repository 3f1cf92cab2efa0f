//! The chat wire format: client frames parsed with simd-json and validated field by
//! field, server frames serialized, and the error codes of the contract.

use serde::Serialize;
use simd_json::prelude::*;
use simd_json::tape::{Object, Value as TapeValue};

/// Limits on client frames. Defaults match docs/PROTOCOL.md.
#[derive(Debug, Clone)]
pub struct Limits {
    pub content_chars_max: usize,
    pub metadata_bytes_max: usize,
    pub metadata_depth_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            content_chars_max: 8000,
            metadata_bytes_max: 4096,
            metadata_depth_max: 4,
        }
    }
}

pub const SESSION_ID_CHARS_MAX: usize = 128;
pub const CLIENT_ID_CHARS_MAX: usize = 64;
pub use crate::llm::MODEL_ID_CHARS_MAX;
pub const FILE_ID_CHARS_MAX: usize = 128;
pub const FILE_URL_CHARS_MAX: usize = 2048;
/// Longest token an `auth_refresh` may carry (a JWT with generous claims).
pub const TOKEN_CHARS_MAX: usize = 8192;
/// Nesting beyond this is refused before parsing: it is an attack, not a message.
pub const JSON_DEPTH_MAX: usize = 16;

/// The contract's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Unauthorized,
    Forbidden,
    InvalidMessage,
    RateLimited,
    NotFound,
    LlmUnavailable,
    Overloaded,
    /// Storage is busy reading (every read connection in use): retry after
    /// `retry_after_ms`.
    Unavailable,
    Internal,
    /// A voice message could not be transcribed; its audio stays attached.
    TranscriptionFailed,
}

/// A client frame, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    UserMessage {
        session_id: Option<String>,
        content: String,
        model_id: Option<String>,
        /// Validated metadata, re-encoded as compact JSON.
        metadata: Option<String>,
        file_url: Option<String>,
    },
    Cancel {
        session_id: String,
    },
    Resume {
        session_id: String,
        after_seq: Option<u64>,
    },
    HelpRequest {
        session_id: String,
    },
    /// One page of older history: up to `limit` messages before `before_seq`.
    History {
        session_id: String,
        before_seq: u64,
        limit: usize,
    },
    /// `file_message` (an uploaded file, with an optional caption), or
    /// `voice_message` (`voice`: an audio file, transcribed, no caption).
    FileMessage {
        session_id: Option<String>,
        file_id: String,
        content: Option<String>,
        voice: bool,
    },
    AdminJoin {
        session_id: String,
    },
    /// Follow a session live (its transcript, then every frame) without taking it
    /// over: the user is not told, the AI keeps answering.
    AdminWatch {
        session_id: String,
    },
    AdminMessage {
        session_id: String,
        content: String,
    },
    AdminLeave {
        session_id: String,
    },
    /// A fresh token for this connection's user: its `exp` replaces the old one.
    AuthRefresh {
        token: String,
    },
}

/// A client frame with the client's correlation `id`, if it sent a valid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub id: Option<String>,
    pub frame: ClientFrame,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Answer with one `error` frame; the connection stays open.
    Error { id: Option<String>, message: String },
    /// Close the connection (1008): nesting deeper than [`JSON_DEPTH_MAX`].
    TooDeep,
}

/// Parses and validates one text frame. `scratch` is reused across calls (simd-json
/// parses in place and needs a mutable copy).
// Long: one arm per client frame type, each validating its fields in place;
// split up, the protocol would no longer read in one place.
pub fn parse(
    text: &str,
    limits: &Limits,
    scratch: &mut Vec<u8>,
    buffers: &mut simd_json::Buffers,
) -> Result<Incoming, Refused> {
    if json_depth(text.as_bytes()) > JSON_DEPTH_MAX {
        return Err(Refused::TooDeep);
    }
    scratch.clear();
    scratch.extend_from_slice(text.as_bytes());
    // The tape is walked in place: no DOM is built for the few fields we read.
    let tape = simd_json::to_tape_with_buffers(scratch.as_mut_slice(), buffers)
        .map_err(|_| invalid(None, "frame is not valid JSON"))?;
    let value = tape.as_value();
    let obj = value
        .as_object()
        .ok_or_else(|| invalid(None, "frame must be a JSON object"))?;
    // The id first, so every later error can carry it.
    let id = match obj.get("id").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => match v.as_str() {
            Some(s) if !s.is_empty() && s.chars().count() <= CLIENT_ID_CHARS_MAX => {
                Some(s.to_owned())
            }
            _ => {
                return Err(invalid(
                    None,
                    &format!("id must be a string of 1..={CLIENT_ID_CHARS_MAX} characters"),
                ))
            }
        },
    };
    let f = Fields { obj: &obj, id: &id };
    let kind = f.req_str("type", 32)?;
    let frame = match kind.as_str() {
        "user_message" => {
            let file_url = f.opt_str("file_url", FILE_URL_CHARS_MAX)?;
            if let Some(u) = &file_url {
                if !u.starts_with("https://") {
                    return Err(f.err("file_url must be an https URL"));
                }
            }
            let content = f.req_str("content", limits.content_chars_max)?;
            if content.trim().is_empty() {
                return Err(f.err("content must not be empty"));
            }
            ClientFrame::UserMessage {
                session_id: f.opt_session_id()?,
                content,
                model_id: f.opt_str("model_id", MODEL_ID_CHARS_MAX)?,
                metadata: f.metadata(limits)?,
                file_url,
            }
        }
        "cancel" => ClientFrame::Cancel {
            session_id: f.session_id()?,
        },
        "resume" => ClientFrame::Resume {
            session_id: f.session_id()?,
            after_seq: match obj.get("after_seq").filter(|v| !v.is_null()) {
                None => None,
                Some(v) => Some(
                    v.as_u64()
                        .ok_or_else(|| f.err("after_seq must be a non-negative integer"))?,
                ),
            },
        },
        "help_request" => ClientFrame::HelpRequest {
            session_id: f.session_id()?,
        },
        "history" => ClientFrame::History {
            session_id: f.session_id()?,
            before_seq: obj
                .get("before_seq")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| f.err("before_seq must be a non-negative integer"))?,
            limit: match obj.get("limit").filter(|v| !v.is_null()) {
                None => HISTORY_PAGE_DEFAULT,
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=HISTORY_PAGE_MAX as u64).contains(n))
                    .ok_or_else(|| {
                        f.err(&format!(
                            "limit must be an integer in 1..={HISTORY_PAGE_MAX}"
                        ))
                    })? as usize,
            },
        },
        "voice_message" | "file_message" => ClientFrame::FileMessage {
            session_id: f.opt_session_id()?,
            file_id: f.req_str("file_id", FILE_ID_CHARS_MAX)?,
            content: f.opt_str("content", limits.content_chars_max)?,
            voice: kind == "voice_message",
        },
        "admin_join" => ClientFrame::AdminJoin {
            session_id: f.session_id()?,
        },
        "admin_watch" => ClientFrame::AdminWatch {
            session_id: f.session_id()?,
        },
        "admin_message" => ClientFrame::AdminMessage {
            session_id: f.session_id()?,
            content: f.req_str("content", limits.content_chars_max)?,
        },
        "admin_leave" => ClientFrame::AdminLeave {
            session_id: f.session_id()?,
        },
        "auth_refresh" => ClientFrame::AuthRefresh {
            token: f.req_str("token", TOKEN_CHARS_MAX)?,
        },
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(f.err(&format!("unknown frame type {shown:?}")));
        }
    };
    Ok(Incoming { id, frame })
}

fn invalid(id: Option<String>, message: &str) -> Refused {
    Refused::Error {
        id,
        message: message.to_owned(),
    }
}

struct Fields<'a, 't, 'i> {
    obj: &'a Object<'t, 'i>,
    id: &'a Option<String>,
}

impl Fields<'_, '_, '_> {
    fn err(&self, message: &str) -> Refused {
        invalid(self.id.clone(), message)
    }

    fn opt_str(&self, name: &str, chars_max: usize) -> Result<Option<String>, Refused> {
        match self.obj.get(name).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => {
                let s = v
                    .as_str()
                    .ok_or_else(|| self.err(&format!("{name} must be a string")))?;
                if s.chars().count() > chars_max {
                    return Err(self.err(&format!("{name} is longer than {chars_max} characters")));
                }
                Ok(Some(s.to_owned()))
            }
        }
    }

    fn req_str(&self, name: &str, chars_max: usize) -> Result<String, Refused> {
        self.opt_str(name, chars_max)?
            .ok_or_else(|| self.err(&format!("{name} is required")))
    }

    fn opt_session_id(&self) -> Result<Option<String>, Refused> {
        let s = self.opt_str("session_id", SESSION_ID_CHARS_MAX)?;
        if let Some(id) = &s {
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(self.err("session_id may contain only letters, digits, '-' and '_'"));
            }
        }
        Ok(s)
    }

    fn session_id(&self) -> Result<String, Refused> {
        self.opt_session_id()?
            .ok_or_else(|| self.err("session_id is required"))
    }

    fn metadata(&self, limits: &Limits) -> Result<Option<String>, Refused> {
        let Some(v) = self.obj.get("metadata") else {
            return Ok(None);
        };
        if v.as_object().is_none() {
            return Err(self.err("metadata must be a JSON object"));
        }
        if value_depth(&v) > limits.metadata_depth_max {
            return Err(self.err(&format!(
                "metadata is nested deeper than {} levels",
                limits.metadata_depth_max
            )));
        }
        let encoded = v.encode();
        if encoded.len() > limits.metadata_bytes_max {
            return Err(self.err(&format!(
                "metadata is larger than {} bytes",
                limits.metadata_bytes_max
            )));
        }
        Ok(Some(encoded))
    }
}

/// Recursion is safe here: the whole frame's depth was bounded before parsing.
fn value_depth(v: &TapeValue) -> usize {
    if let Some(o) = v.as_object() {
        1 + o.iter().map(|(_, v)| value_depth(&v)).max().unwrap_or(0)
    } else if let Some(a) = v.as_array() {
        1 + a.iter().map(|v| value_depth(&v)).max().unwrap_or(0)
    } else {
        0
    }
}

/// Deepest bracket nesting in `json` (ignoring brackets inside strings), or an upper
/// bound of it when that bound is within [`JSON_DEPTH_MAX`]. Linear and
/// allocation-free, so it can run before a parser that recurses (simd-json's DOM).
pub fn json_depth(json: &[u8]) -> usize {
    // Fast path: no more opening brackets in all than the limit bounds the depth.
    // memchr scans with SIMD and stops at the limit; nearly every frame ends here.
    let opening = memchr::memchr2_iter(b'{', b'[', json)
        .take(JSON_DEPTH_MAX + 1)
        .count();
    if opening <= JSON_DEPTH_MAX {
        return opening;
    }
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A `history` page's size when the client names none, and the most it may ask.
pub const HISTORY_PAGE_DEFAULT: usize = 50;
pub const HISTORY_PAGE_MAX: usize = 200;

/// Server frames, serialized with serde.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Session {
        session_id: &'a str,
        created: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        messages: Option<&'a [HistoryItem]>,
        /// The names of the agents who have taken the session over, when any.
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        agents: &'a [&'a str],
    },
    /// One page of older history, oldest first; `before_seq` asks for the page
    /// before it (absent: nothing older is left).
    History {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        session_id: &'a str,
        messages: &'a [HistoryItem],
        #[serde(skip_serializing_if = "Option::is_none")]
        before_seq: Option<u64>,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        session_id: &'a str,
        message_id: &'a str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    AiChunk {
        session_id: &'a str,
        message_id: &'a str,
        seq: u64,
        content: &'a str,
    },
    AiDone {
        session_id: &'a str,
        message_id: &'a str,
        usage: Usage,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
    },
    /// To admins in the session: what the user wrote.
    UserMessage {
        session_id: &'a str,
        message_id: &'a str,
        user_id: &'a str,
        content: &'a str,
        /// The file a `file_message` attached.
        #[serde(skip_serializing_if = "Option::is_none")]
        file: Option<&'a crate::store::FileRef>,
        /// `file_url` and `metadata`, as the user sent them.
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        extra: Option<&'a crate::app::chat::extra::Extra>,
    },
    /// A voice message's transcript, now that message's content.
    Transcript {
        session_id: &'a str,
        message_id: &'a str,
        content: &'a str,
    },
    AdminJoined {
        session_id: &'a str,
        admin_name: &'a str,
        /// Sent to the connection that joined (or left), so a client knows its own
        /// join without comparing names, which need not be unique.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        you: bool,
    },
    AdminMessage {
        session_id: &'a str,
        admin_name: &'a str,
        message_id: &'a str,
        content: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    AdminLeft {
        session_id: &'a str,
        admin_name: &'a str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        you: bool,
    },
    /// An admin ended the session; it takes no new messages.
    SessionEnded { session_id: &'a str },
    HelpRequested {
        session_id: &'a str,
        user_id: &'a str,
        user_name: &'a str,
        at: i64,
    },
    /// An `auth_refresh` was accepted: the connection now lives until `expires_at`
    /// (Unix seconds).
    AuthRefreshed {
        expires_at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    Error {
        code: Code,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

/// `unavailable` for what needs a part of the service that cannot be reached now,
/// with the pause after which a retry may succeed.
pub fn unavailable_frame(message: &str, id: Option<&str>, retry_after_ms: u64) -> String {
    ServerFrame::Error {
        code: Code::Unavailable,
        message,
        id,
        session_id: None,
        retry_after_ms: Some(retry_after_ms),
    }
    .to_json()
}

/// The error for a read from storage that failed: `unavailable` with when to
/// retry for back-pressure (every read connection busy, queue full), else
/// `internal` with `message`.
pub fn store_read_error(e: &crate::store::StoreError, message: &str, id: Option<&str>) -> String {
    let (code, message, retry_after_ms) = match e.retry_after_ms() {
        Some(ms) => (Code::Unavailable, "storage is busy; retry", Some(ms)),
        None => (Code::Internal, message, None),
    };
    ServerFrame::Error {
        code,
        message,
        id,
        session_id: None,
        retry_after_ms,
    }
    .to_json()
}

pub fn error_frame(code: Code, message: &str, id: Option<&str>) -> String {
    ServerFrame::Error {
        code,
        message,
        id,
        session_id: None,
        retry_after_ms: None,
    }
    .to_json()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One entry of `session.messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryItem {
    pub message_id: String,
    /// The message's position in the session (`history` pages by it).
    pub seq: u64,
    pub role: &'static str,
    pub content: String,
    pub created_at: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
    /// The file the message carries (`file_message`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<crate::store::FileRef>,
    /// `file_url` and `metadata`, as the user sent them.
    #[serde(flatten)]
    pub extra: crate::app::chat::extra::Extra,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Incoming, Refused> {
        parse(
            text,
            &Limits::default(),
            &mut Vec::new(),
            &mut simd_json::Buffers::default(),
        )
    }

    fn err_msg(text: &str) -> (Option<String>, String) {
        match p(text) {
            Err(Refused::Error { id, message }) => (id, message),
            other => panic!("expected an error for {text}, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_user_message() {
        let i = p(r#"{"type":"user_message","id":"c1","content":"hi","session_id":"s-1","metadata":{"a":[1]}}"#).unwrap();
        assert_eq!(i.id.as_deref(), Some("c1"));
        assert_eq!(
            i.frame,
            ClientFrame::UserMessage {
                session_id: Some("s-1".into()),
                content: "hi".into(),
                model_id: None,
                metadata: Some(r#"{"a":[1]}"#.into()),
                file_url: None,
            }
        );
        let a = p(r#"{"type":"auth_refresh","id":"r1","token":"a.b.c"}"#).unwrap();
        assert_eq!(
            (a.id.as_deref(), a.frame),
            (
                Some("r1"),
                ClientFrame::AuthRefresh {
                    token: "a.b.c".into()
                }
            )
        );
        let r = p(r#"{"type":"resume","session_id":"abc","after_seq":7}"#).unwrap();
        assert_eq!(
            r.frame,
            ClientFrame::Resume {
                session_id: "abc".into(),
                after_seq: Some(7)
            }
        );
    }

    #[test]
    fn every_limit_is_an_error_carrying_the_id() {
        let long_sid = "s".repeat(129);
        let long_content = "x".repeat(8001);
        let cases = [
            format!(r#"{{"type":"user_message","id":"c","content":"hi","session_id":"{long_sid}"}}"#),
            format!(r#"{{"type":"user_message","id":"c","content":"{long_content}"}}"#),
            r#"{"type":"user_message","id":"c","content":""}"#.to_string(),
            r#"{"type":"user_message","id":"c"}"#.to_string(),
            r#"{"type":"user_message","id":"c","content":"hi","session_id":"a b"}"#.to_string(),
            r#"{"type":"user_message","id":"c","content":"hi","model_id":7}"#.to_string(),
            format!(r#"{{"type":"user_message","id":"c","content":"hi","model_id":"{}"}}"#, "m".repeat(65)),
            r#"{"type":"user_message","id":"c","content":"hi","metadata":[1]}"#.to_string(),
            r#"{"type":"user_message","id":"c","content":"hi","metadata":{"a":{"b":{"c":{"d":{}}}}}}"#.to_string(),
            format!(r#"{{"type":"user_message","id":"c","content":"hi","metadata":{{"a":"{}"}}}}"#, "x".repeat(5000)),
            r#"{"type":"user_message","id":"c","content":"hi","file_url":"http://x"}"#.to_string(),
            format!(r#"{{"type":"file_message","id":"c","session_id":"s","file_id":"{}"}}"#, "f".repeat(129)),
            r#"{"type":"resume","id":"c","session_id":"s","after_seq":-1}"#.to_string(),
            r#"{"type":"cancel","id":"c"}"#.to_string(),
            r#"{"type":"auth_refresh","id":"c"}"#.to_string(),
            format!(r#"{{"type":"auth_refresh","id":"c","token":"{}"}}"#, "t".repeat(8193)),
            r#"{"type":"nope","id":"c"}"#.to_string(),
        ];
        for c in cases {
            let (id, msg) = err_msg(&c);
            assert_eq!(id.as_deref(), Some("c"), "{c} -> {msg}");
        }
        assert_eq!(err_msg("[1,2]").0, None);
        assert_eq!(err_msg("not json").0, None);
        assert_eq!(
            err_msg(r#"{"type":"cancel","id":5}"#).0,
            None,
            "a non-string id is not echoed"
        );
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(p(&deep), Err(Refused::TooDeep));
        let quoted = format!(r#"{{"a":"{}\"]]"}}"#, "[".repeat(40));
        assert_eq!(
            json_depth(quoted.as_bytes()),
            1,
            "brackets in strings do not count"
        );
        assert_eq!(json_depth(b"[[[]]]"), 3);
    }

    #[test]
    fn server_frames_match_the_contract() {
        let f = ServerFrame::AiDone {
            session_id: "s",
            message_id: "m",
            usage: Usage {
                input_tokens: 1,
                output_tokens: 2,
            },
            cancelled: false,
        };
        assert_eq!(
            f.to_json(),
            r#"{"type":"ai_done","session_id":"s","message_id":"m","usage":{"input_tokens":1,"output_tokens":2}}"#
        );
        assert_eq!(
            error_frame(Code::RateLimited, "slow down", Some("c1")),
            r#"{"type":"error","code":"rate_limited","message":"slow down","id":"c1"}"#
        );
    }

    #[test]
    fn busy_storage_is_unavailable_with_when_to_retry() {
        use crate::store::StoreError;
        let busy = StoreError::ReadersBusy {
            readers: 1,
            retry_after_ms: 250,
        };
        let v: serde_json::Value =
            serde_json::from_str(&store_read_error(&busy, "x", Some("c1"))).unwrap();
        assert_eq!(v["code"], "unavailable");
        assert_eq!(v["retry_after_ms"], 250);
        assert_eq!(v["id"], "c1");
        let broken: serde_json::Value =
            serde_json::from_str(&store_read_error(&StoreError::Stopped, "gone", None)).unwrap();
        assert_eq!(broken["code"], "internal");
        assert!(broken.get("retry_after_ms").is_none() || broken["retry_after_ms"].is_null());
    }
}
