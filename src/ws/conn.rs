//! Drives one upgraded WebSocket on its owning core: tungstenite's protocol state
//! over a readiness-driven socket, keep-alive pings with a pong deadline, the
//! connection's outbox, and close codes that say why.
//!
//! All replies produced by one burst of reads leave in one `send` (tungstenite
//! buffers writes; we flush once per loop turn), which is what makes pipelined
//! traffic cheap.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::Duration;

use monoio::time::Instant;
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

use super::handler::{Handler, Reply};
use super::handshake::Upgrade;
use crate::io::{NonBlocking, Socket};
use crate::shard::outbox::{Outbox, Outgoing};
use crate::shard::registry::Registration;
use crate::shard::Core;

/// Bytes tungstenite reads per call. tungstenite allocates this buffer eagerly and
/// keeps it, so it is most of an idle connection's memory: 1 KiB instead of 4 KiB
/// saved 3 KB per idle connection at no measurable cost to chat round trips
/// (PERF.md). Larger frames still arrive whole; they just take more reads.
const READ_CHUNK_BYTES: usize = 1024;
/// How long we wait for the peer's answer to our close frame.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);

/// Why the loop stopped; decides the close frame, if any.
enum End {
    /// The close handshake finished or the peer went away: nothing more to send.
    Done,
    /// Fail the connection with this code, without waiting for an answer.
    Fail(CloseCode, &'static str),
}

/// Keeps the open-connection gauge right however the task ends.
struct OpenGauge<'a>(&'a Core);
impl Drop for OpenGauge<'_> {
    fn drop(&mut self) {
        self.0.metrics().ws_open.dec();
    }
}

pub async fn run(core: Rc<Core>, sock: Socket, up: Upgrade, reg: Registration, outbox: Outbox) {
    // Counted before the 101 leaves, so a client that is connected is always counted.
    let m = core.metrics();
    m.ws_open.inc();
    let _gauge = OpenGauge(&core);
    if sock.send_all(up.response().as_bytes()).await.is_err() {
        return;
    }
    m.ws_upgraded.inc();
    let cfg = &core.shared.config;
    let ws_cfg = WebSocketConfig::default()
        .read_buffer_size(READ_CHUNK_BYTES)
        .write_buffer_size(cfg.ws_write_buffer_bytes_max)
        .max_write_buffer_size(cfg.ws_write_buffer_bytes_max + cfg.ws_message_bytes_max + 64)
        .max_message_size(Some(cfg.ws_message_bytes_max))
        .max_frame_size(Some(cfg.ws_frame_bytes_max));
    let mut ctx = WebSocketContext::from_partially_read(up.leftover, Role::Server, Some(ws_cfg));
    let user = up
        .identity
        .as_ref()
        .map_or_else(|| "-".into(), |i| i.user_id.clone());
    let span =
        tracing::debug_span!("ws", conn = reg.id, core = core.id, user = %user, peer = %up.peer);
    let mut handler = Handler::new(&core, reg.id, up.route, up.identity);
    let _enter = span.enter();
    tracing::debug!("websocket open");

    let mut io = NonBlocking::new(&sock);
    let end = drive(&core, &mut ctx, &mut io, &mut handler, &outbox).await;
    if let End::Fail(code, reason) = end {
        tracing::debug!(?code, reason, "closing websocket");
        let _ = ctx.close(
            &mut io,
            Some(CloseFrame {
                code,
                reason: reason.into(),
            }),
        );
        let _ = ctx.flush(&mut io);
    }
    // Unregister before the FIN: a client that saw EOF may reconnect at once and
    // must find its slot free.
    outbox.close();
    drop(reg);
    sock.shutdown_write();
}

async fn drive(
    core: &Core,
    ctx: &mut WebSocketContext,
    io: &mut NonBlocking<'_>,
    handler: &mut Handler,
    outbox: &Outbox,
) -> End {
    let cfg = &core.shared.config;
    let m = core.metrics();
    let ping_interval = Duration::from_millis(cfg.ws_ping_interval_ms);
    let pong_timeout = Duration::from_millis(cfg.ws_pong_timeout_ms);
    let mut last_rx = Instant::now();
    let mut pong_deadline: Option<Instant> = None;
    let mut close_deadline: Option<Instant> = None;
    let mut want_write = false;
    let sock = io.sock;

    loop {
        // 1. Everything readable now.
        let before = io.bytes_in;
        loop {
            match ctx.read(io) {
                Ok(msg) => {
                    let reply = match msg {
                        Message::Text(t) => {
                            m.frames_in.inc();
                            match catch_unwind(AssertUnwindSafe(|| handler.on_text(t.as_str()))) {
                                Ok(r) => r,
                                Err(_) => {
                                    m.panics.inc();
                                    tracing::error!(
                                        "message handler panicked; closing this connection only"
                                    );
                                    return End::Fail(CloseCode::Error, "internal error");
                                }
                            }
                        }
                        Message::Binary(b) => {
                            m.frames_in.inc();
                            handler.on_binary(b)
                        }
                        // Pings are answered by tungstenite; any frame proves liveness.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Reply::None,
                        Message::Close(_) => Reply::None,
                    };
                    let out = match reply {
                        Reply::None => None,
                        Reply::Text(t) => Some(Message::text(t)),
                        Reply::Binary(b) => Some(Message::Binary(b)),
                        Reply::Close(code, reason) => return End::Fail(code, reason),
                    };
                    if let Some(msg) = out {
                        m.frames_out.inc();
                        if let Some(end) = write(ctx, io, msg, &mut want_write) {
                            return end;
                        }
                    }
                }
                Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return read_error(e),
            }
        }
        if io.bytes_in != before {
            m.bytes_in.add(io.bytes_in - before);
            last_rx = Instant::now();
            pong_deadline = None;
        }

        // 2. What other tasks queued for this connection.
        if outbox.overflowed() {
            m.slow_consumers.inc();
            return End::Fail(CloseCode::Again, "too slow reading; reconnect");
        }
        while let Some(out) = outbox.pop() {
            match out {
                Outgoing::Text(t) => {
                    m.frames_out.inc();
                    if let Some(end) = write(ctx, io, Message::text(t.as_ref()), &mut want_write) {
                        return end;
                    }
                }
                Outgoing::Shutdown if close_deadline.is_none() => {
                    let frame = CloseFrame {
                        code: CloseCode::Away,
                        reason: "server shutting down".into(),
                    };
                    let _ = ctx.close(io, Some(frame));
                    // Wait for the client's answer, but never past the shutdown deadline.
                    let reply_by = Instant::now() + CLOSE_REPLY_WAIT;
                    close_deadline = Some(
                        core.shutdown_deadline()
                            .map_or(reply_by, |d| d.min(reply_by)),
                    );
                }
                Outgoing::Shutdown => {}
            }
        }

        // 3. One send for everything produced above.
        let sent_before = io.bytes_out;
        let flushed = ctx.flush(io);
        m.bytes_out.add(io.bytes_out - sent_before);
        match flushed {
            Ok(()) => want_write = false,
            Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => want_write = true,
            Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => return End::Done,
            Err(e) => {
                tracing::debug!(error = %e, "write failed");
                return End::Done;
            }
        }

        // 4. Wait for the next thing to do.
        let now = Instant::now();
        if let Some(d) = close_deadline {
            if now >= d {
                return End::Done;
            }
        }
        match pong_deadline {
            Some(d) if now >= d => {
                m.pong_timeouts.inc();
                return End::Fail(CloseCode::Policy, "pong timeout");
            }
            None if now >= last_rx + ping_interval && close_deadline.is_none() => {
                m.pings_sent.inc();
                if let Some(end) =
                    write(ctx, io, Message::Ping(Default::default()), &mut want_write)
                {
                    return end;
                }
                pong_deadline = Some(now + pong_timeout);
                continue;
            }
            _ => {}
        }
        let timer = [
            pong_deadline.or(Some(last_rx + ping_interval)),
            close_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + ping_interval);
        monoio::select! {
            r = sock.readable() => {
                if r.is_err() {
                    return End::Done;
                }
                io.drained = false;
            }
            r = sock.writable(), if want_write => {
                if r.is_err() {
                    return End::Done;
                }
            }
            _ = outbox.ready() => {}
            _ = monoio::time::sleep_until(timer) => {}
        }
    }
}

/// Queues a message; `Some(end)` if the connection must stop.
fn write(
    ctx: &mut WebSocketContext,
    io: &mut NonBlocking<'_>,
    msg: Message,
    want_write: &mut bool,
) -> Option<End> {
    match ctx.write(io, msg) {
        Ok(()) => None,
        // Queued, but the socket is full: flush again when it is writable.
        Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
            *want_write = true;
            None
        }
        Err(WsError::WriteBufferFull(_)) => {
            Some(End::Fail(CloseCode::Again, "too slow reading; reconnect"))
        }
        Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => Some(End::Done),
        Err(e) => {
            tracing::debug!(error = %e, "write failed");
            Some(End::Done)
        }
    }
}

/// Maps a read error to how the connection ends.
fn read_error(e: WsError) -> End {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::Done,
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            End::Fail(CloseCode::Size, "message too big")
        }
        WsError::Capacity(_) => End::Fail(CloseCode::Size, "frame too big"),
        WsError::Utf8(_) => End::Fail(CloseCode::Invalid, "invalid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Done,
        WsError::Protocol(p) => {
            tracing::debug!(error = %p, "protocol error");
            End::Fail(CloseCode::Protocol, "protocol error")
        }
        WsError::Io(e) => {
            tracing::debug!(error = %e, "read failed");
            End::Done
        }
        other => {
            tracing::debug!(error = %other, "websocket error");
            End::Fail(CloseCode::Protocol, "protocol error")
        }
    }
}
