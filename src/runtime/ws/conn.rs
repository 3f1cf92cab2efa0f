//! Drives one upgraded WebSocket on its owning core: our RFC 6455 codec over a
//! readiness-driven socket, keep-alive pings with a pong deadline, the
//! connection's outbox, and close codes that say why.
//!
//! All replies produced by one burst of reads leave in one `send` (the codec
//! queues frames; we flush once per loop turn), which is what makes pipelined
//! traffic cheap.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::Duration;

use monoio::time::Instant;
use tungstenite::protocol::frame::coding::CloseCode;

use super::codec::{Codec, Limits, Msg, WsError};
use super::handler::Handler;
use super::handshake::{Route, Upgrade};
use crate::clock::now_ms;
use crate::limiter::FrameGuard;
use crate::runtime::app::{App, Reply};
use crate::runtime::core::Core;
use crate::runtime::io::Socket;
use crate::runtime::outbox::{Keepalive, Outbox, Outgoing, CLOSE_TOKEN_EXPIRED};
use crate::runtime::registry::Registration;

/// How long we wait for the peer's answer to our close frame.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);

/// Why the loop stopped; decides the close frame, if any.
enum End {
    /// The close handshake finished or the peer went away: nothing more to send.
    Done,
    /// Fail the connection with this code, without waiting for an answer.
    Fail(CloseCode, &'static str),
    /// We sent a close frame (shutdown): wait a little for the peer's answer.
    Linger,
}

impl From<WsError> for End {
    fn from(e: WsError) -> End {
        match e.close() {
            Some((code, why)) => {
                tracing::debug!(error = ?e, "websocket error");
                End::Fail(code, why)
            }
            None => End::Done,
        }
    }
}

/// Keeps the open-connection gauge right however the task ends.
struct OpenGauge<A: App>(Rc<Core<A>>);
impl<A: App> Drop for OpenGauge<A> {
    fn drop(&mut self) {
        self.0.metrics().ws_open.dec();
    }
}

/// An upgraded connection: everything an idle WebSocket holds between bursts. It
/// runs as a task of its own, so an idle connection costs this and the wait in
/// [`Conn::run`], not the state of the handshake that led to it.
pub struct Conn<A: App> {
    // Fields drop in this order if the task unwinds: the registry entry goes
    // before the socket closes.
    gauge: OpenGauge<A>,
    reg: Registration,
    outbox: Outbox,
    handler: Handler<A::Conn>,
    codec: Codec,
    sock: Socket,
}

/// Sends the 101 and sets the connection up; `None` if the client is already gone.
pub async fn upgrade<A: App>(
    core: &Rc<Core<A>>,
    sock: Socket,
    up: Upgrade,
    reg: Registration,
    outbox: Outbox,
) -> Option<Box<Conn<A>>> {
    // Counted before the 101 leaves, so a client that is connected is always counted.
    let m = core.metrics();
    m.ws_open.inc();
    let gauge = OpenGauge(core.clone());
    sock.send_all(up.response().as_bytes()).await.ok()?;
    m.ws_upgraded.inc();
    let cfg = &core.shared.config;
    // Room for one whole message on top of the backlog we tolerate.
    let limits = Limits::new(
        cfg.ws_frame_bytes_max,
        cfg.ws_message_bytes_max,
        cfg.ws_write_buffer_bytes_max + cfg.ws_message_bytes_max + 64,
    );
    let user = up.identity.as_ref().map_or("-", |i| &*i.user_id);
    let trace_id = up.trace.trace_id;
    tracing::debug!(conn = reg.id, core = core.id, user, peer = %up.peer, %trace_id, "websocket open");
    // The token holds for the connection's life: the keep-alive sweep closes it
    // when `exp` passes (no timer of its own).
    if up.expires != 0 {
        core.registry.borrow().set_expiry(reg.id, up.expires);
    }
    let app = match (up.route, up.identity) {
        (Route::Chat, Some(identity)) => Some(A::open(core, reg.id, identity)),
        _ => None,
    };
    let mut codec = Codec::new(up.leftover, limits);
    if app.is_some() {
        // The flood guard, on frames of every kind; the echo route has none.
        let guard = FrameGuard::new(cfg.ws_frames_per_minute_max, now_ms());
        codec = codec.with_frame_guard(guard);
    }
    Some(Box::new(Conn {
        gauge,
        handler: Handler::new(app, up.trace),
        codec,
        reg,
        outbox,
        sock,
    }))
}

impl<A: App> Conn<A> {
    /// Boxed: an `async fn` keeps its arguments twice, and this one is the state of
    /// every idle connection.
    pub async fn run(mut self: Box<Self>) {
        let end = match self.drive().await {
            // Wait for the client's answer, but never past the shutdown deadline.
            End::Linger => {
                let core = &self.gauge.0;
                let reply_by = Instant::now() + CLOSE_REPLY_WAIT;
                let until = core
                    .shutdown_deadline()
                    .map_or(reply_by, |d| d.min(reply_by));
                // Boxed: only connections at shutdown pay for this timer.
                Box::pin(self.linger(until)).await
            }
            end => end,
        };
        if let End::Fail(code, reason) = end {
            let trace_id = self.handler.trace.trace_id;
            tracing::debug!(conn = self.reg.id, %trace_id, ?code, reason, "closing websocket");
            if code == CloseCode::Again {
                // A slow reader: its close goes before the backlog it cannot take,
                // and waits for room a little (not past the shutdown deadline).
                self.gauge.0.metrics().slow_consumers.inc();
                self.codec.close_before_queued(code, reason);
                let _ = self.codec.flush(&self.sock);
                if self.codec.wants_write() {
                    Box::pin(self.flush_close()).await;
                }
            } else {
                let _ = self.codec.send_close(code, reason);
                let _ = self.codec.flush(&self.sock);
            }
        }
        // Unregister before the FIN: a client that saw EOF may reconnect at once and
        // must find its slot free.
        self.outbox.close();
        let Conn { reg, sock, .. } = *self;
        drop(reg);
        sock.shutdown_write();
    }

    /// The connection's loop. Fields are reached through `self` at every use (not
    /// bound to locals), so the waiting future holds one pointer, not five.
    async fn drive(&mut self) -> End {
        // After a short read the socket is taken as drained until the next readiness.
        let mut drained = false;
        loop {
            // 1. Everything readable now.
            let mut got = 0;
            loop {
                if let Some(end) = self.read_all() {
                    return end;
                }
                if self.codec.is_closed() {
                    let _ = self.codec.flush(&self.sock);
                    return End::Done;
                }
                if drained {
                    break;
                }
                match self.codec.fill(&self.sock) {
                    Ok(0) => drained = true,
                    Ok(n) => got += n,
                    Err(e) => return e.into(),
                }
            }
            if got > 0 {
                self.gauge.0.metrics().bytes_in.add(got as u64);
                self.outbox.touch();
            }

            // 2. What other tasks and the keep-alive sweep asked of this connection.
            if let Some(end) = self.take_outbox() {
                return end;
            }

            // 3. One send for everything produced above.
            match self.codec.flush(&self.sock) {
                Ok(n) => self.gauge.0.metrics().bytes_out.add(n as u64),
                Err(e) => return e.into(),
            }

            // 4. Wait for the next thing to do. The wait for writability is rare (the
            // peer reads slowly) and boxed, so an idle connection's task stays small.
            let ready = if self.codec.wants_write() {
                Box::pin(wait_rw(&self.sock, &self.outbox)).await
            } else {
                monoio::select! {
                    r = self.sock.readable() => Wake::Readable(r.is_ok()),
                    _ = self.outbox.ready() => Wake::Outbox,
                }
            };
            match ready {
                Wake::Readable(false) | Wake::Writable(false) => return End::Done,
                Wake::Readable(true) => drained = false,
                Wake::Writable(true) | Wake::Outbox => {}
            }
        }
    }

    /// Handles every complete message received so far; `Some(end)` to stop. What
    /// each message queued for this connection moves to the codec right away, so a
    /// burst of our own requests (an admin joining a hundred sessions) cannot
    /// overflow the outbox and be taken for a slow reader.
    fn read_all(&mut self) -> Option<End> {
        loop {
            match read_one(&self.gauge.0, &mut self.codec, &mut self.handler) {
                Ok(None) => return None,
                Ok(Some(Reply::Close(code, reason))) => return Some(End::Fail(code, reason)),
                Ok(Some(_)) => {}
                Err(e) => return Some(e.into()),
            }
            if let Some(end) = self.take_outbox() {
                return Some(end);
            }
        }
    }

    /// Frames queued by other tasks, and what the keep-alive sweep asked for.
    fn take_outbox(&mut self) -> Option<End> {
        let m = self.gauge.0.metrics();
        if self.outbox.overflowed() {
            return Some(End::Fail(CloseCode::Again, "too slow reading; reconnect"));
        }
        match self.outbox.take_keepalive() {
            Keepalive::Nothing => {}
            Keepalive::Ping => {
                m.pings_sent.inc();
                if let Err(e) = self.codec.send_ping() {
                    return Some(e.into());
                }
            }
            Keepalive::TimedOut => {
                m.pong_timeouts.inc();
                return Some(End::Fail(CloseCode::Policy, "pong timeout"));
            }
        }
        while let Some(out) = self.outbox.pop() {
            match out {
                Outgoing::Text(t) => {
                    m.frames_out.inc();
                    if let Err(e) = self.codec.send_text(&t) {
                        return Some(e.into());
                    }
                }
                Outgoing::Shutdown => {
                    let _ = self
                        .codec
                        .send_close(CloseCode::Away, "server shutting down");
                    let _ = self.codec.flush(&self.sock);
                    return Some(End::Linger);
                }
                // Token expired (4001) or an admin's disconnect (4003).
                Outgoing::Close(code, reason) => {
                    if code == CLOSE_TOKEN_EXPIRED {
                        m.tokens_expired.inc();
                    }
                    return Some(End::Fail(CloseCode::from(code), reason));
                }
            }
        }
        None
    }

    /// Sends what is left of our close (and the frame before it) as the peer makes
    /// room, for at most [`CLOSE_REPLY_WAIT`] and never past the shutdown deadline.
    async fn flush_close(&mut self) {
        let core = &self.gauge.0;
        let by = Instant::now() + CLOSE_REPLY_WAIT;
        let until = core.shutdown_deadline().map_or(by, |d| d.min(by));
        while self.codec.wants_write() {
            monoio::select! {
                r = self.sock.writable() => {
                    if r.is_err() || self.codec.flush(&self.sock).is_err() {
                        return;
                    }
                }
                _ = monoio::time::sleep_until(until) => return,
            }
        }
    }

    /// After our close frame: reads (and drops) until the peer's close or `until`.
    async fn linger(&mut self, until: Instant) -> End {
        let (codec, sock) = (&mut self.codec, &self.sock);
        loop {
            while let Ok(Some(_)) = codec.read() {}
            if codec.is_closed() {
                let _ = codec.flush(sock);
                return End::Done;
            }
            match codec.fill(sock) {
                Ok(0) => {}
                Ok(_) => continue,
                Err(_) => return End::Done,
            }
            let want_write = codec.wants_write();
            monoio::select! {
                r = sock.readable() => if r.is_err() { return End::Done; },
                r = sock.writable(), if want_write => {
                    if r.is_err() || codec.flush(sock).is_err() {
                        return End::Done;
                    }
                }
                _ = monoio::time::sleep_until(until) => return End::Done,
            }
        }
    }
}

/// What ended a wait; `false` when the socket reported an error.
enum Wake {
    Readable(bool),
    Writable(bool),
    Outbox,
}

async fn wait_rw(sock: &Socket, outbox: &Outbox) -> Wake {
    monoio::select! {
        r = sock.readable() => Wake::Readable(r.is_ok()),
        r = sock.writable() => Wake::Writable(r.is_ok()),
        _ = outbox.ready() => Wake::Outbox,
    }
}

/// Handles the next complete message received; `Ok(None)` when there is none.
fn read_one<A: App>(
    core: &Core<A>,
    codec: &mut Codec,
    handler: &mut Handler<A::Conn>,
) -> Result<Option<Reply>, WsError> {
    let m = core.metrics();
    let reply = match codec.read()? {
        None | Some(Msg::Close) => return Ok(None),
        Some(Msg::Text(t)) => {
            m.frames_in.inc();
            let hook = core.shared.hooks.on_text.as_ref();
            let handle = || {
                if let Some(hook) = hook {
                    hook(t);
                }
                handler.on_text(t)
            };
            catch_unwind(AssertUnwindSafe(handle)).unwrap_or_else(|_| {
                m.panics.inc();
                tracing::error!("message handler panicked; closing this connection only");
                Reply::Close(CloseCode::Error, "internal error")
            })
        }
        Some(Msg::Binary(b)) => {
            m.frames_in.inc();
            handler.on_binary(b)
        }
    };
    match &reply {
        Reply::Text(t) => {
            m.frames_out.inc();
            codec.send_text(t)?;
        }
        Reply::Binary(b) => {
            m.frames_out.inc();
            codec.send_binary(b)?;
        }
        Reply::None | Reply::Close(..) => {}
    }
    Ok(Some(reply))
}
