//! What a connection does with each message it receives: echo it, or hand it to
//! the chat pipeline after the flood guard and validation.

use std::rc::Rc;
use std::sync::Arc;

use tungstenite::protocol::frame::coding::CloseCode;

use super::handshake::Route;
use crate::auth::Identity;
use crate::chat::frames::{error_frame, Code, Refused};
use crate::chat::limiter::Bucket;
use crate::chat::{now_ms, ChatConn};
use crate::shard::registry::ConnId;
use crate::shard::Core;

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
    Binary(Vec<u8>),
    Close(CloseCode, &'static str),
}

pub struct Handler {
    /// Present on the chat route (authenticated); absent on the echo route.
    chat: Option<ChatConn>,
    /// Every frame costs a token; a connection that runs out is flooding.
    flood: Bucket,
    flood_per_minute: u32,
}

impl Handler {
    pub fn new(core: &Rc<Core>, conn: ConnId, route: Route, identity: Option<Identity>) -> Handler {
        let flood_per_minute = core.shared.config.ws_frames_per_minute_max;
        let chat = match (route, identity) {
            (Route::Chat, Some(id)) => Some(ChatConn::new(core.clone(), conn, id)),
            _ => None,
        };
        Handler {
            chat,
            flood: Bucket::full(flood_per_minute, now_ms()),
            flood_per_minute,
        }
    }

    pub fn on_text(&mut self, text: &str) -> Reply {
        let Some(chat) = &self.chat else {
            return Reply::Text(text.to_owned());
        };
        let rate = self.flood_per_minute;
        if self.flood.take(rate, rate, now_ms()).is_err() {
            return Reply::Close(CloseCode::Policy, "too many frames");
        }
        let core = chat.core();
        match core.chat.parse(text, &core.shared.chat.limits) {
            Err(Refused::TooDeep) => Reply::Close(CloseCode::Policy, "JSON nested too deeply"),
            Err(Refused::Error { id, message }) => {
                core.metrics().invalid_frames.inc();
                Reply::Text(error_frame(Code::InvalidMessage, &message, id.as_deref()))
            }
            Ok(incoming) => chat.dispatch(incoming).map_or(Reply::None, Reply::Text),
        }
    }

    pub fn on_binary(&mut self, data: &[u8]) -> Reply {
        match self.chat {
            None => Reply::Binary(data.to_vec()),
            Some(_) => Reply::Close(CloseCode::Unsupported, "binary frames are not supported"),
        }
    }
}
