//! Target `frames`: the client frame parser (src/app/frames.rs `parse`).
//!
//! Oracles beyond "does not panic": the depth guard agrees with an independent
//! bracket count (refuses exactly what is nested deeper than `JSON_DEPTH_MAX`, and
//! nothing deeper ever reaches the JSON parser); an accepted frame is within every
//! limit (lengths in characters, identifiers' alphabet, https file URLs, metadata
//! a JSON object within its depth and size); an accepted frame written back as
//! JSON parses to the same frame; scratch buffers reused across calls (as a
//! connection does) change nothing.

use std::cell::RefCell;

use chatbox::app::frames::{
    parse, ClientFrame, Incoming, Limits, Refused, CLIENT_ID_CHARS_MAX, FILE_ID_CHARS_MAX,
    FILE_URL_CHARS_MAX, HISTORY_PAGE_MAX, JSON_DEPTH_MAX, MODEL_ID_CHARS_MAX, SESSION_ID_CHARS_MAX,
    TOKEN_CHARS_MAX,
};
use serde_json::{json, Value};

use crate::rng::{hash, mix};

/// Limits small enough for short inputs to reach them.
fn tight() -> Limits {
    Limits {
        content_chars_max: 10,
        metadata_bytes_max: 64,
        metadata_depth_max: 2,
    }
}

const NOT_JSON: &str = "frame is not valid JSON";

thread_local! {
    /// Reused across inputs, as a connection reuses its parser's buffers.
    static SCRATCH: RefCell<(Vec<u8>, simd_json::Buffers)> = RefCell::default();
}

fn parse_reusing(text: &str, limits: &Limits) -> Result<Incoming, Refused> {
    SCRATCH.with(|s| {
        let (scratch, buffers) = &mut *s.borrow_mut();
        parse(text, limits, scratch, buffers)
    })
}

pub fn check(input: &[u8]) -> Result<u64, String> {
    // The codec hands the parser UTF-8 only.
    let text = String::from_utf8_lossy(input);
    let mut sig = 0;
    for limits in [Limits::default(), tight()] {
        let got = parse_reusing(&text, &limits);
        let fresh = parse(&text, &limits, &mut Vec::new(), &mut Default::default());
        if got != fresh {
            return Err(format!("reused buffers gave {got:?}, fresh ones {fresh:?}"));
        }
        check_depth(&text, &got)?;
        if let Ok(incoming) = &got {
            check_limits(incoming, &limits).map_err(|e| format!("accepted {incoming:?}: {e}"))?;
            check_reparse(incoming, &limits)?;
        }
        sig = mix(sig, signature(&got));
    }
    // Nesting and size too: most inputs end in a few errors, and these tell
    // apart the ones worth mutating further.
    let depth = nesting(input).min(JSON_DEPTH_MAX + 1) as u64;
    let size = u64::from(usize::BITS - input.len().leading_zeros());
    Ok(mix(mix(sig, depth), size))
}

/// Deepest nesting of brackets outside strings: written apart from
/// `frames::json_depth`, which it checks.
pub fn nesting(json: &[u8]) -> usize {
    let mut depth: usize = 0;
    let mut deepest = 0;
    let mut bytes = json.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'"' => {
                // Skip the string, escapes included.
                while let Some(&c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn check_depth(text: &str, got: &Result<Incoming, Refused>) -> Result<(), String> {
    let depth = nesting(text.as_bytes());
    let parsed = match got {
        Err(Refused::TooDeep) if depth <= JSON_DEPTH_MAX => {
            return Err(format!("refused as too deep at depth {depth}"))
        }
        Err(Refused::TooDeep) => return Ok(()),
        Err(Refused::Error { message, .. }) => message != NOT_JSON,
        Ok(_) => true,
    };
    if parsed && depth > JSON_DEPTH_MAX {
        return Err(format!("depth {depth} passed the guard into the parser"));
    }
    Ok(())
}

fn chars_within(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.chars().count())
}

fn session_id_ok(s: &str) -> bool {
    chars_within(s, 1, SESSION_ID_CHARS_MAX)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_limits(incoming: &Incoming, limits: &Limits) -> Result<(), String> {
    let content_ok = |c: &str| chars_within(c, 0, limits.content_chars_max);
    if let Some(id) = &incoming.id {
        if !chars_within(id, 1, CLIENT_ID_CHARS_MAX) {
            return Err("id length".into());
        }
    }
    let ok = match &incoming.frame {
        ClientFrame::UserMessage {
            session_id,
            content,
            model_id,
            metadata,
            file_url,
        } => {
            if let Some(m) = metadata {
                check_metadata(m, limits)?;
            }
            session_id.as_deref().is_none_or(session_id_ok)
                && content_ok(content)
                && !content.trim().is_empty()
                && model_id
                    .as_deref()
                    .is_none_or(|m| chars_within(m, 0, MODEL_ID_CHARS_MAX))
                && file_url.as_deref().is_none_or(|u| {
                    u.starts_with("https://") && chars_within(u, 0, FILE_URL_CHARS_MAX)
                })
        }
        ClientFrame::FileMessage {
            session_id,
            file_id,
            content,
            ..
        } => {
            session_id.as_deref().is_none_or(session_id_ok)
                && chars_within(file_id, 0, FILE_ID_CHARS_MAX)
                && content.as_deref().is_none_or(content_ok)
        }
        ClientFrame::AdminMessage {
            session_id,
            content,
        } => session_id_ok(session_id) && content_ok(content),
        ClientFrame::Cancel { session_id }
        | ClientFrame::Resume { session_id, .. }
        | ClientFrame::HelpRequest { session_id }
        | ClientFrame::AdminJoin { session_id }
        | ClientFrame::AdminWatch { session_id }
        | ClientFrame::AdminLeave { session_id } => session_id_ok(session_id),
        ClientFrame::AuthRefresh { token } => chars_within(token, 1, TOKEN_CHARS_MAX),
        ClientFrame::History {
            session_id, limit, ..
        } => session_id_ok(session_id) && (1..=HISTORY_PAGE_MAX).contains(limit),
    };
    if ok {
        Ok(())
    } else {
        Err("a field is outside its limits".into())
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Stored metadata is a JSON object any JSON reader takes, within its limits.
fn check_metadata(m: &str, limits: &Limits) -> Result<(), String> {
    let v: Value =
        serde_json::from_str(m).map_err(|e| format!("metadata {m:?} is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("metadata is not an object".into());
    }
    if depth(&v) > limits.metadata_depth_max || m.len() > limits.metadata_bytes_max {
        return Err("metadata past its limits".into());
    }
    Ok(())
}

/// The frame as a client would write it.
pub fn to_json(incoming: &Incoming) -> Value {
    let mut v = match &incoming.frame {
        ClientFrame::UserMessage {
            session_id,
            content,
            model_id,
            metadata,
            file_url,
        } => {
            let metadata = metadata.as_deref().map(serde_json::from_str::<Value>);
            json!({"type": "user_message", "session_id": session_id, "content": content,
                "model_id": model_id, "file_url": file_url,
                "metadata": metadata.and_then(Result::ok)})
        }
        ClientFrame::Cancel { session_id } => json!({"type": "cancel", "session_id": session_id}),
        ClientFrame::Resume {
            session_id,
            after_seq,
        } => json!({"type": "resume", "session_id": session_id, "after_seq": after_seq}),
        ClientFrame::HelpRequest { session_id } => {
            json!({"type": "help_request", "session_id": session_id})
        }
        ClientFrame::FileMessage {
            session_id,
            file_id,
            content,
            voice,
        } => json!({"type": if *voice { "voice_message" } else { "file_message" },
            "session_id": session_id, "file_id": file_id, "content": content}),
        ClientFrame::AdminJoin { session_id } => {
            json!({"type": "admin_join", "session_id": session_id})
        }
        ClientFrame::AdminWatch { session_id } => {
            json!({"type": "admin_watch", "session_id": session_id})
        }
        ClientFrame::AdminMessage {
            session_id,
            content,
        } => json!({"type": "admin_message", "session_id": session_id, "content": content}),
        ClientFrame::AdminLeave { session_id } => {
            json!({"type": "admin_leave", "session_id": session_id})
        }
        ClientFrame::AuthRefresh { token } => json!({"type": "auth_refresh", "token": token}),
        ClientFrame::History {
            session_id,
            before_seq,
            limit,
        } => json!({"type": "history", "session_id": session_id,
            "before_seq": before_seq, "limit": limit}),
    };
    if let (Some(id), Some(o)) = (&incoming.id, v.as_object_mut()) {
        o.insert("id".into(), json!(id));
    }
    // Absent optional fields are left out rather than sent as null.
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, f| !f.is_null());
    }
    v
}

/// An accepted frame, written back, parses to itself (metadata compared as JSON).
fn check_reparse(incoming: &Incoming, limits: &Limits) -> Result<(), String> {
    let text = to_json(incoming).to_string();
    let again = parse(&text, limits, &mut Vec::new(), &mut Default::default())
        .map_err(|e| format!("{incoming:?} written as {text} is refused: {e:?}"))?;
    let meta = |i: &Incoming| match &i.frame {
        ClientFrame::UserMessage { metadata, .. } => metadata
            .as_deref()
            .map(|m| serde_json::from_str::<Value>(m).ok()),
        _ => None,
    };
    let strip = |i: &Incoming| {
        let mut i = i.clone();
        if let ClientFrame::UserMessage { metadata, .. } = &mut i.frame {
            *metadata = None;
        }
        i
    };
    if strip(&again) != strip(incoming) || meta(&again) != meta(incoming) {
        return Err(format!(
            "{incoming:?} written as {text} parses as {again:?}"
        ));
    }
    Ok(())
}

/// Which behaviour an input showed: the frame kind and its optional parts, or the
/// error up to its first quoted part or number.
fn signature(r: &Result<Incoming, Refused>) -> u64 {
    match r {
        Ok(i) => {
            let shape = format!(
                "{:?}",
                to_json(i).as_object().map(|o| o.keys().collect::<Vec<_>>())
            );
            let kind = to_json(i)["type"].to_string();
            hash(format!("{kind}{shape}").as_bytes())
        }
        Err(Refused::TooDeep) => 1,
        Err(Refused::Error { id, message }) => {
            let stem: String = message
                .chars()
                .take_while(|c| *c != '"' && !c.is_ascii_digit())
                .collect();
            hash(format!("{}{stem}", id.is_some()).as_bytes())
        }
    }
}
