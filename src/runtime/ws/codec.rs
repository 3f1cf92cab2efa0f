//! The server side of RFC 6455 over tungstenite's frame headers, with buffers that
//! exist only while bytes move: an idle connection holds no read or write buffer.
//!
//! Why not tungstenite's `WebSocketContext`: it allocates its read buffer up front
//! and keeps every buffer at its high-water mark for the life of the connection,
//! which made it most of an idle connection's memory (PERF.md). Header parsing and
//! formatting, opcodes and close codes still come from tungstenite.
//!
//! Reading: [`Codec::fill`] receives into `rx` (allocated on demand); [`Codec::read`]
//! returns whole messages, unmasked in place, and answers pings itself. When every
//! byte received has been consumed, `rx` is freed. Writing: frames are appended to
//! `tx` (bounded) and [`Codec::flush`] sends them; a drained `tx` is freed.

use std::io::{self, Cursor};

use tungstenite::error::ProtocolError;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::clock::now_ms;
use crate::limiter::FrameGuard;
use crate::runtime::io::Socket;

/// Bytes asked of the kernel per `recv`: large enough that a burst of pipelined
/// frames arrives in one call; the buffer is freed again once it is consumed.
const RECV_BYTES: usize = 16 * 1024;
/// At most this many bytes per `recv` while a large frame arrives.
const RECV_BYTES_MAX: usize = 256 * 1024;
/// Control frames carry at most this many payload bytes (RFC 6455 5.5).
const CONTROL_PAYLOAD_BYTES_MAX: u64 = 125;

/// Why the connection must end; each maps to one close code.
#[derive(Debug, PartialEq, Eq)]
pub enum WsError {
    /// The peer broke the protocol (1002).
    Protocol(&'static str),
    /// A frame or message over its limit (1009).
    TooBig(&'static str),
    /// A text message or close reason that is not UTF-8 (1007).
    Utf8,
    /// Our queue of unsent bytes is full: the peer reads too slowly (1013).
    WriteFull,
    /// More frames than the flood guard allows (1008).
    Flood,
    /// The peer closed the TCP connection (no close frame to send).
    Eof,
    /// The socket failed (no close frame to send).
    Io(io::ErrorKind),
}

impl WsError {
    /// The close frame to send, if the connection can still take one.
    pub fn close(&self) -> Option<(CloseCode, &'static str)> {
        match self {
            WsError::Protocol(why) => Some((CloseCode::Protocol, why)),
            WsError::TooBig(why) => Some((CloseCode::Size, why)),
            WsError::Utf8 => Some((CloseCode::Invalid, "invalid UTF-8")),
            WsError::WriteFull => Some((CloseCode::Again, "too slow reading; reconnect")),
            WsError::Flood => Some((CloseCode::Policy, "too many frames")),
            WsError::Eof | WsError::Io(_) => None,
        }
    }
}

/// One complete message, borrowed from the codec until the next call.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    /// The peer's close frame; our answer is already queued.
    Close,
}

/// The limits a connection enforces, from the config.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub frame_bytes_max: u32,
    pub message_bytes_max: u32,
    /// Unsent bytes we queue before calling the peer too slow.
    pub tx_bytes_max: u32,
}

impl Limits {
    /// From byte counts in the config (which caps them far below 4 GiB).
    pub fn new(frame_bytes_max: usize, message_bytes_max: usize, tx_bytes_max: usize) -> Limits {
        let cap = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Limits {
            frame_bytes_max: cap(frame_bytes_max),
            message_bytes_max: cap(message_bytes_max),
            tx_bytes_max: cap(tx_bytes_max),
        }
    }
}

/// Bytes a codec holds (see [`Codec::held`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Received bytes not yet consumed (at most a partial frame between reads).
    pub rx_unread: usize,
    pub rx_capacity: usize,
    /// An incomplete fragmented message.
    pub fragments: usize,
    /// Encoded frames not yet sent.
    pub tx: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    Open,
    /// We sent a close frame and wait for the peer's.
    Sent,
    /// Close frames went both ways (or the peer's arrived and ours is queued).
    Done,
}

/// Where `next_message` found a complete message.
enum Ready {
    Whole {
        text: bool,
        start: usize,
        end: usize,
    },
    Reassembled {
        text: bool,
    },
    Close,
}

/// A message that arrives in fragments, kept only while it is incomplete.
struct Fragments {
    text: bool,
    buf: Vec<u8>,
    /// Prefix of `buf` known to be valid UTF-8 (text only): checked as it arrives.
    valid: usize,
}

pub struct Codec {
    rx: Vec<u8>,
    /// Bytes of `rx` already consumed.
    rx_pos: usize,
    frag: Option<Box<Fragments>>,
    /// Set when the last message returned by `read` was reassembled from fragments,
    /// which are dropped on the next call.
    reassembled: bool,
    /// Encoded frames not yet sent (a partial send drains what went).
    tx: Vec<u8>,
    /// Bytes at the head of `tx` that finish a frame already partly sent: they
    /// must go before anything else, or the peer's framing breaks.
    tx_front: usize,
    closing: Closing,
    limits: Limits,
    /// Counts every frame the peer sends, of any kind; absent on the echo route.
    guard: Option<FrameGuard>,
}

impl Codec {
    /// A codec that starts with bytes the handshake read past the request head.
    pub fn new(leftover: Vec<u8>, limits: Limits) -> Codec {
        Codec {
            rx: leftover,
            rx_pos: 0,
            frag: None,
            reassembled: false,
            tx: Vec::new(),
            tx_front: 0,
            closing: Closing::Open,
            limits,
            guard: None,
        }
    }

    /// Puts every frame the peer sends from now on (pings, pongs, continuations,
    /// close included) under `guard`: over it, reading fails with [`WsError::Flood`].
    pub fn with_frame_guard(mut self, guard: FrameGuard) -> Codec {
        self.guard = Some(guard);
        self
    }

    /// Receives what the socket has. `Ok(0)` means nothing is there now (wait for
    /// readiness); `Err(Eof)` that the peer closed.
    pub fn fill(&mut self, sock: &Socket) -> Result<usize, WsError> {
        self.compact();
        // At least a burst's worth; the rest of a large frame whose room
        // `next_frame` reserved, in one call.
        let room = (self.rx.capacity() - self.rx.len()).clamp(RECV_BYTES, RECV_BYTES_MAX);
        match sock.try_recv_into(&mut self.rx, room) {
            Ok(0) => Err(WsError::Eof),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.shrink_rx();
                Ok(0)
            }
            Err(e) => Err(WsError::Io(e.kind())),
        }
    }

    /// Appends bytes as if [`Codec::fill`] had received them: the seam that unit
    /// tests and the fuzzer (fuzz/) drive the codec through without a socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.compact();
        self.rx.extend_from_slice(bytes);
    }

    /// Drops what `read` already returned, so received bytes can be appended.
    #[inline]
    fn compact(&mut self) {
        self.release_last();
        if self.rx_pos > 0 {
            self.rx.drain(..self.rx_pos);
            self.rx_pos = 0;
        }
    }

    /// The next complete message in what was received, or `None` when more bytes are
    /// needed. Pings are answered here; pongs and frames after our close are skipped.
    pub fn read(&mut self) -> Result<Option<Msg<'_>>, WsError> {
        self.release_last();
        let (text, bytes) = match self.next_message()? {
            None => return Ok(None),
            Some(Ready::Close) => return Ok(Some(Msg::Close)),
            Some(Ready::Whole { text, start, end }) => (text, &self.rx[start..end]),
            Some(Ready::Reassembled { text }) => {
                self.reassembled = true;
                let frag = self.frag.as_ref().ok_or(WsError::Protocol("no message"))?;
                (text, &frag.buf[..])
            }
        };
        Ok(Some(if text {
            Msg::Text(std::str::from_utf8(bytes).map_err(|_| WsError::Utf8)?)
        } else {
            Msg::Binary(bytes)
        }))
    }

    fn next_message(&mut self) -> Result<Option<Ready>, WsError> {
        loop {
            let Some((header, len)) = self.next_frame()? else {
                self.shrink_rx();
                return Ok(None);
            };
            // Counted before anything is done with the frame (a ping is not answered
            // past the allowance). Frames after a close are dropped unread.
            if let (Some(guard), Closing::Open) = (&mut self.guard, self.closing) {
                if !guard.frame(now_ms) {
                    return Err(WsError::Flood);
                }
            }
            let start = self.rx_pos;
            let end = start + len;
            self.rx_pos = end;
            if let Some(mask) = header.mask {
                unmask(&mut self.rx[start..end], mask);
            }
            if self.closing == Closing::Done {
                continue;
            }
            match header.opcode {
                OpCode::Control(Control::Ping) => {
                    if self.closing == Closing::Open {
                        let payload = self.rx[start..end].to_vec();
                        self.push_frame(OpCode::Control(Control::Pong), &payload)?;
                    }
                }
                OpCode::Control(Control::Pong) => {}
                OpCode::Control(Control::Close) => {
                    let code = self.check_close(start, end)?;
                    if self.closing == Closing::Open {
                        let payload = code.map(|c| u16::from(c).to_be_bytes());
                        let payload = payload.as_ref().map_or(&[][..], |p| &p[..]);
                        self.push_frame(OpCode::Control(Control::Close), payload)?;
                    }
                    self.closing = Closing::Done;
                    return Ok(Some(Ready::Close));
                }
                OpCode::Control(_) => return Err(WsError::Protocol("unknown control opcode")),
                OpCode::Data(data) => {
                    if self.closing != Closing::Open {
                        continue;
                    }
                    if let Some(ready) = self.on_data(data, header.is_final, start, end)? {
                        return Ok(Some(ready));
                    }
                }
            }
        }
    }

    /// Parses the next frame header and checks that its payload has arrived; the
    /// cursor then stands at the payload.
    fn next_frame(&mut self) -> Result<Option<(FrameHeader, usize)>, WsError> {
        let mut cur = Cursor::new(&self.rx[self.rx_pos..]);
        let parsed = FrameHeader::parse(&mut cur).map_err(|e| match e {
            tungstenite::Error::Protocol(ProtocolError::InvalidOpcode(_)) => {
                WsError::Protocol("reserved opcode")
            }
            _ => WsError::Protocol("malformed frame header"),
        })?;
        let Some((header, len)) = parsed else {
            return Ok(None);
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        if header.mask.is_none() {
            return Err(WsError::Protocol("client frames must be masked"));
        }
        match header.opcode {
            OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                return Err(WsError::Protocol("reserved opcode"))
            }
            OpCode::Control(_) if !header.is_final || len > CONTROL_PAYLOAD_BYTES_MAX => {
                return Err(WsError::Protocol("fragmented or oversized control frame"))
            }
            _ => {}
        }
        if len > self.limits.frame_bytes_max as u64 {
            return Err(WsError::TooBig("frame too big"));
        }
        let head = cur.position() as usize;
        let len = len as usize;
        if self.rx.len() - self.rx_pos - head < len {
            // Make room for the whole frame once, not one recv at a time.
            self.rx.reserve(head + len);
            return Ok(None);
        }
        self.rx_pos += head;
        Ok(Some((header, len)))
    }

    /// A data frame: a whole message, or a fragment to keep.
    fn on_data(
        &mut self,
        data: Data,
        fin: bool,
        start: usize,
        end: usize,
    ) -> Result<Option<Ready>, WsError> {
        let max = self.limits.message_bytes_max as usize;
        match (data, self.frag.as_mut()) {
            (Data::Continue, None) => Err(WsError::Protocol("continuation without a message")),
            (Data::Text | Data::Binary, Some(_)) => {
                Err(WsError::Protocol("new message inside a fragmented one"))
            }
            (Data::Continue, Some(frag)) => {
                if frag.buf.len() + (end - start) > max {
                    return Err(WsError::TooBig("message too big"));
                }
                frag.buf.extend_from_slice(&self.rx[start..end]);
                if frag.text {
                    frag.valid = check_utf8(&frag.buf, frag.valid, fin)?;
                }
                Ok(fin.then_some(Ready::Reassembled { text: frag.text }))
            }
            (Data::Text | Data::Binary, None) => {
                let text = data == Data::Text;
                if end - start > max {
                    return Err(WsError::TooBig("message too big"));
                }
                if fin {
                    return Ok(Some(Ready::Whole { text, start, end }));
                }
                let buf = self.rx[start..end].to_vec();
                let valid = if text { check_utf8(&buf, 0, false)? } else { 0 };
                self.frag = Some(Box::new(Fragments { text, buf, valid }));
                Ok(None)
            }
            (Data::Reserved(_), _) => Err(WsError::Protocol("reserved opcode")),
        }
    }

    /// Drops a reassembled message once the caller is done with it.
    fn release_last(&mut self) {
        if std::mem::take(&mut self.reassembled) {
            self.frag = None;
        }
    }

    /// Frees the read buffer once everything in it is consumed.
    fn shrink_rx(&mut self) {
        if self.rx_pos == self.rx.len() {
            self.rx = Vec::new();
            self.rx_pos = 0;
        }
    }

    /// Validates a close frame's payload; the code to echo back.
    fn check_close(&self, start: usize, end: usize) -> Result<Option<CloseCode>, WsError> {
        match &self.rx[start..end] {
            [] => Ok(None),
            [_] => Err(WsError::Protocol("close frame with a one-byte payload")),
            [hi, lo, reason @ ..] => {
                let code = CloseCode::from(u16::from_be_bytes([*hi, *lo]));
                if !code.is_allowed() {
                    return Err(WsError::Protocol("invalid close code"));
                }
                std::str::from_utf8(reason).map_err(|_| WsError::Utf8)?;
                Ok(Some(CloseCode::Normal))
            }
        }
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: &str) -> Result<(), WsError> {
        self.send_data(OpCode::Data(Data::Text), text.as_bytes())
    }

    /// Queues a binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), WsError> {
        self.send_data(OpCode::Data(Data::Binary), data)
    }

    /// Queues a keep-alive ping.
    pub fn send_ping(&mut self) -> Result<(), WsError> {
        self.send_data(OpCode::Control(Control::Ping), &[])
    }

    fn send_data(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), WsError> {
        if self.closing != Closing::Open {
            return Ok(()); // nothing but the close may follow a close
        }
        self.push_frame(opcode, payload)
    }

    /// Starts the closing handshake (once); the caller waits for the peer's answer.
    pub fn send_close(&mut self, code: CloseCode, reason: &str) -> Result<(), WsError> {
        if self.closing != Closing::Open {
            return Ok(());
        }
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&u16::from(code).to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        self.closing = Closing::Sent;
        // A close is sent even past the write limit: it is the last thing we say.
        self.frame_into_tx(OpCode::Control(Control::Close), &payload);
        Ok(())
    }

    /// Closes at once, before the frames still queued: drops every frame not yet
    /// begun (the rest of one partly sent still goes) and queues the close. For a
    /// peer that does not read, so that the close is the next thing it gets.
    pub fn close_before_queued(&mut self, code: CloseCode, reason: &str) {
        self.tx.truncate(self.tx_front);
        let _ = self.send_close(code, reason);
    }

    /// True once close frames went both ways: the connection is over.
    pub fn is_closed(&self) -> bool {
        self.closing == Closing::Done
    }

    fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), WsError> {
        if self.tx.len() + payload.len() > self.limits.tx_bytes_max as usize {
            return Err(WsError::WriteFull);
        }
        self.frame_into_tx(opcode, payload);
        Ok(())
    }

    fn frame_into_tx(&mut self, opcode: OpCode, payload: &[u8]) {
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let len = payload.len() as u64;
        self.tx.reserve(header.len(len) + payload.len());
        // Writing into a Vec cannot fail.
        let _ = header.format(len, &mut self.tx);
        self.tx.extend_from_slice(payload);
    }

    /// What the codec holds now, for the fuzzer's memory bounds.
    pub fn held(&self) -> Held {
        Held {
            rx_unread: self.rx.len() - self.rx_pos,
            rx_capacity: self.rx.capacity(),
            fragments: self.frag.as_ref().map_or(0, |f| f.buf.len()),
            tx: self.tx.len(),
        }
    }

    /// Encoded frames waiting for [`Codec::flush`] (what the peer will receive).
    pub fn queued(&self) -> &[u8] {
        &self.tx
    }

    /// True when queued bytes wait for the socket to take them.
    pub fn wants_write(&self) -> bool {
        !self.tx.is_empty()
    }

    /// Sends what is queued, as far as the socket takes it; the bytes sent.
    pub fn flush(&mut self, sock: &Socket) -> Result<usize, WsError> {
        let mut sent = 0;
        while sent < self.tx.len() {
            match sock.try_send(&self.tx[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Rare (the peer reads slowly): keep only what is left.
                    self.tx_front = self.front_after(sent);
                    self.tx.drain(..sent);
                    return Ok(sent);
                }
                Err(e) => return Err(WsError::Io(e.kind())),
            }
        }
        self.tx = Vec::new();
        self.tx_front = 0;
        Ok(sent)
    }

    /// Once the first `sent` bytes of `tx` are gone: how many of the rest finish a
    /// frame already begun. Our frames are whole in `tx` and unmasked.
    fn front_after(&self, sent: usize) -> usize {
        let mut end = self.tx_front;
        while end < sent {
            end += own_frame_len(&self.tx[end..]);
        }
        end - sent
    }
}

/// The length, header included, of the frame of ours that `buf` starts with.
fn own_frame_len(buf: &[u8]) -> usize {
    let be = |b: &[u8]| b.iter().fold(0usize, |n, &x| (n << 8) | x as usize);
    match buf[1] & 0x7f {
        126 => 4 + be(&buf[2..4]),
        127 => 10 + be(&buf[2..10]),
        n => 2 + n as usize,
    }
}

/// Checks `buf[from..]` as UTF-8 and returns how far it is valid. A sequence cut off
/// at the end is fine unless this is the message's last fragment; an invalid one
/// fails at once (so a bad fragment ends the connection before the rest arrives).
fn check_utf8(buf: &[u8], from: usize, fin: bool) -> Result<usize, WsError> {
    match std::str::from_utf8(&buf[from..]) {
        Ok(_) => Ok(buf.len()),
        Err(e) if e.error_len().is_none() && !fin => Ok(from + e.valid_up_to()),
        Err(_) => Err(WsError::Utf8),
    }
}

/// XORs a client frame's payload with its mask, eight bytes at a time.
fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
