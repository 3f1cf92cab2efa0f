//! What a connection does with each message it receives: echo it (the
//! conformance endpoint) or hand it to the application.
//!
//! The flood guard is not here: it counts frames of every kind, pings and
//! continuations included, so it lives where frames are parsed (the codec's
//! `FrameGuard`, set up in `conn::upgrade` for the chat route).

use crate::runtime::app::{AppConn, Reply};
use crate::trace::{scope, TraceCtx};

pub struct Handler<C> {
    /// Present on the chat route (authenticated); absent on the echo route.
    app: Option<C>,
    /// The connection's trace: current while the application handles a message,
    /// so what it logs, spawns and sends on carries it.
    pub trace: TraceCtx,
}

impl<C: AppConn> Handler<C> {
    pub fn new(app: Option<C>, trace: TraceCtx) -> Handler<C> {
        Handler { app, trace }
    }

    pub fn on_text(&mut self, text: &str) -> Reply {
        match &mut self.app {
            None => Reply::Text(text.to_owned()),
            Some(app) => scope(Some(self.trace), || app.on_text(text)),
        }
    }

    pub fn on_binary(&mut self, data: &[u8]) -> Reply {
        match &mut self.app {
            None => Reply::Binary(data.to_vec()),
            Some(app) => scope(Some(self.trace), || app.on_binary(data)),
        }
    }
}
