//! What a connection does with each message it receives: echo, or the chat
//! protocol (issue 2 stage: every frame is parsed and answered with an `error`).

use std::sync::Arc;

use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;

use super::handshake::Route;
use crate::auth::Identity;

/// A callback shared by every core.
pub type TextHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Test seams injected at start-up; `Hooks::default()` in production.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called with every text message before it is handled (a test makes it panic).
    pub on_text: Option<TextHook>,
}

/// What the connection loop should do after a message.
pub enum Reply {
    None,
    Text(String),
    Binary(bytes::Bytes),
    Close(CloseCode, &'static str),
}

pub struct Handler {
    route: Route,
    #[allow(dead_code)] // used by the chat pipeline
    identity: Option<Identity>,
    hooks: Hooks,
}

impl Handler {
    pub fn new(route: Route, identity: Option<Identity>, hooks: Hooks) -> Handler {
        Handler {
            route,
            identity,
            hooks,
        }
    }

    pub fn on_text(&mut self, text: &str) -> Reply {
        if let Some(hook) = &self.hooks.on_text {
            hook(text);
        }
        match self.route {
            Route::Echo => Reply::Text(text.to_owned()),
            Route::Chat => Reply::Text(chat_frame(text)),
        }
    }

    pub fn on_binary(&mut self, data: bytes::Bytes) -> Reply {
        match self.route {
            Route::Echo => Reply::Binary(data),
            Route::Chat => Reply::Close(CloseCode::Unsupported, "binary frames are not supported"),
        }
    }
}

/// Parses a chat frame and answers it. Until the chat pipeline lands every frame
/// type is unknown, so the answer is always one `error` frame carrying the id.
fn chat_frame(text: &str) -> String {
    let parsed: Result<Value, _> = serde_json::from_str(text);
    let (id, message) = match &parsed {
        Ok(Value::Object(map)) => {
            let id = map
                .get("id")
                .filter(|v| v.is_string() || v.is_number())
                .cloned();
            match map.get("type").and_then(Value::as_str) {
                Some(t) => (
                    id,
                    format!(
                        "unknown frame type {:?}",
                        t.chars().take(32).collect::<String>()
                    ),
                ),
                None => (id, "frame has no \"type\"".to_owned()),
            }
        }
        _ => (None, "frame is not a JSON object".to_owned()),
    };
    let mut err =
        serde_json::json!({"type": "error", "code": "invalid_message", "message": message});
    if let Some(id) = id {
        err["id"] = id;
    }
    err.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_errors_carry_the_client_id() {
        let v: Value = serde_json::from_str(&chat_frame(r#"{"type":"nope","id":"m1"}"#)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "invalid_message");
        assert_eq!(v["id"], "m1");
        let v: Value = serde_json::from_str(&chat_frame("not json")).unwrap();
        assert!(v.get("id").is_none());
    }
}
