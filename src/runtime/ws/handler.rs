//! What a connection does with each message it receives: the flood guard, then
//! echo it (the conformance endpoint) or hand it to the application.

use tungstenite::protocol::frame::coding::CloseCode;

use crate::clock::now_ms;
use crate::limiter::Bucket;
use crate::runtime::app::{AppConn, Reply};

pub struct Handler<C> {
    /// Present on the chat route (authenticated); absent on the echo route.
    app: Option<C>,
    /// Every frame costs a token; a connection that runs out is flooding.
    flood: Bucket,
    flood_per_minute: u32,
}

impl<C: AppConn> Handler<C> {
    pub fn new(app: Option<C>, flood_per_minute: u32) -> Handler<C> {
        Handler {
            app,
            flood: Bucket::full(flood_per_minute, now_ms()),
            flood_per_minute,
        }
    }

    pub fn on_text(&mut self, text: &str) -> Reply {
        let Some(app) = &mut self.app else {
            return Reply::Text(text.to_owned());
        };
        let rate = self.flood_per_minute;
        if self.flood.take(rate, rate, now_ms()).is_err() {
            return Reply::Close(CloseCode::Policy, "too many frames");
        }
        app.on_text(text)
    }

    pub fn on_binary(&mut self, data: &[u8]) -> Reply {
        match &mut self.app {
            None => Reply::Binary(data.to_vec()),
            Some(app) => app.on_binary(data),
        }
    }
}
