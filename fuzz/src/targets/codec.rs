//! Target `codec`: the WebSocket codec (src/runtime/ws/codec.rs), fed through its
//! `feed` seam as a socket would.
//!
//! Oracles: the same bytes fed whole and in random chunk splits (byte by byte
//! too) give the same messages, the same error and the same queued output; what
//! the codec holds between reads stays within its limits plus one frame header
//! (and nothing once all is consumed); what it queues is well-formed server
//! frames; and the input read as a program of valid masked frames (see
//! [`super::codec_plan`]) round-trips to exactly its messages and pongs.

use chatbox::runtime::ws::codec::{Codec, Limits, Msg, WsError};
use tungstenite::protocol::frame::coding::CloseCode;

use super::codec_plan;
use crate::rng::{hash, mix, Rng};
use crate::ws;

/// Small limits, so that size checks are reached by short inputs.
pub const SMALL: Limits = Limits {
    frame_bytes_max: 64,
    message_bytes_max: 100,
    tx_bytes_max: 256,
};

/// Room for 16- and 64-bit length frames.
pub const ROOMY: Limits = Limits {
    frame_bytes_max: 70_000,
    message_bytes_max: 140_000,
    tx_bytes_max: 200_000,
};

/// The longest frame header (64-bit length and a mask).
const HEADER_BYTES_MAX: usize = 14;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Text(String),
    Binary(Vec<u8>),
    Close,
}

/// Everything observable after feeding an input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub events: Vec<Event>,
    /// The error that ended reading, if any.
    pub end: Option<WsError>,
    pub tx: Vec<u8>,
    pub closed: bool,
}

pub fn check(input: &[u8]) -> Result<u64, String> {
    let mut sig = 0;
    for (i, limits) in [SMALL, ROOMY].into_iter().enumerate() {
        let whole = run(input, &[], limits, &[])?;
        check_output(&whole)?;
        let mut rng = Rng::new(hash(input) ^ i as u64);
        for cuts in splits(&mut rng, input.len()) {
            let got = run(input, &cuts, limits, &[])?;
            if got != whole {
                return Err(format!(
                    "limits {limits:?}: fed in chunks {cuts:?}, the codec saw {}; fed whole, {}",
                    brief(&got),
                    brief(&whole)
                ));
            }
        }
        sig = mix(sig, signature(&whole));
    }
    codec_plan::round_trip(input)?;
    Ok(sig)
}

/// Chunk sizes to feed `len` bytes in: one byte at a time (short inputs), and
/// random splits both fine and coarse.
fn splits(rng: &mut Rng, len: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    if len <= 2048 {
        out.push(vec![1; len]);
    }
    for max in [16, 4096] {
        let mut cuts = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = rng.size(max).min(left);
            cuts.push(n);
            left -= n;
        }
        out.push(cuts);
    }
    out
}

/// What the server does between reads, once the input up to an offset is read.
#[derive(Clone, Debug)]
pub enum Action {
    Text(String),
    Close,
}

/// Feeds `input` in chunks of `cuts` (the rest at once; the first chunk as the
/// handshake's leftover), split further at each action's offset, reading every
/// message after each chunk and acting where the actions say.
pub fn run(
    input: &[u8],
    cuts: &[usize],
    limits: Limits,
    actions: &[(usize, Action)],
) -> Result<Outcome, String> {
    let mut ends = Vec::new();
    let mut at = 0;
    for &n in cuts {
        at = (at + n).min(input.len());
        ends.push(at);
    }
    ends.push(input.len());
    ends.extend(actions.iter().map(|(offset, _)| (*offset).min(input.len())));
    ends.sort_unstable();
    ends.dedup();
    let mut ends = ends.into_iter();
    let first = ends.next().unwrap_or(0);
    let mut c = Codec::new(input[..first].to_vec(), limits);
    let mut out = Outcome::default();
    let mut pending = actions.iter().peekable();
    let (mut at, mut chunk_max) = (first, first);
    loop {
        if drain(&mut c, &mut out, limits)? {
            break;
        }
        check_held(&c, limits, chunk_max)?;
        while let Some((_, action)) = pending.next_if(|(offset, _)| *offset <= at) {
            let done = match action {
                Action::Text(t) => c.send_text(t),
                Action::Close => c.send_close(CloseCode::Away, "bye"),
            };
            done.map_err(|e| format!("{action:?} at {at} failed: {e:?}"))?;
        }
        let Some(end) = ends.next() else {
            break;
        };
        c.feed(&input[at..end]);
        chunk_max = chunk_max.max(end - at);
        at = end;
    }
    out.tx = c.queued().to_vec();
    out.closed = c.is_closed();
    Ok(out)
}

/// Reads until more bytes are needed (false) or reading failed (true).
fn drain(c: &mut Codec, out: &mut Outcome, limits: Limits) -> Result<bool, String> {
    loop {
        let msg = c.read();
        if let Ok(Some(Msg::Text(t))) = &msg {
            check_size(t.len(), limits)?;
        }
        if let Ok(Some(Msg::Binary(b))) = &msg {
            check_size(b.len(), limits)?;
        }
        let event = match msg {
            Ok(None) => return Ok(false),
            Err(e) => {
                out.end = Some(e);
                return Ok(true);
            }
            Ok(Some(Msg::Text(t))) => Event::Text(t.to_owned()),
            Ok(Some(Msg::Binary(b))) => Event::Binary(b.to_vec()),
            Ok(Some(Msg::Close)) => {
                if !c.is_closed() {
                    return Err("a close was returned but the codec is not closed".into());
                }
                Event::Close
            }
        };
        if out.events.last() == Some(&Event::Close) {
            return Err(format!("{} after the close", kind(&event)));
        }
        out.events.push(event);
    }
}

fn check_size(len: usize, limits: Limits) -> Result<(), String> {
    if len > limits.message_bytes_max as usize {
        return Err(format!("a message of {len} bytes passed {limits:?}"));
    }
    Ok(())
}

/// Between reads the codec holds at most a partial frame, an incomplete message
/// within its limit, and its write limit plus one header; nothing when idle.
fn check_held(c: &Codec, limits: Limits, chunk_max: usize) -> Result<(), String> {
    let h = c.held();
    let frame = HEADER_BYTES_MAX + limits.frame_bytes_max as usize;
    let why = if h.rx_unread >= frame {
        "more unread bytes than one frame"
    } else if h.rx_unread == 0 && h.rx_capacity != 0 {
        "an idle codec keeps its read buffer"
    } else if h.rx_capacity > 2 * (2 * frame + chunk_max) {
        "the read buffer outgrew a frame and a chunk"
    } else if h.fragments > limits.message_bytes_max as usize {
        "fragments past the message limit"
    } else if h.tx > limits.tx_bytes_max as usize + HEADER_BYTES_MAX {
        "queued output past the write limit"
    } else {
        return Ok(());
    };
    Err(format!(
        "{why}: {h:?} with {limits:?}, chunks up to {chunk_max}"
    ))
}

/// What the codec queued is unmasked pongs (125 bytes at most) and at most one
/// close, last, echoing 1000 or empty.
fn check_output(out: &Outcome) -> Result<(), String> {
    let frames = ws::read_server(&out.tx)?;
    for (i, f) in frames.iter().enumerate() {
        let ok = match f.first {
            0x8a => f.payload.len() <= 125,
            0x88 => i + 1 == frames.len() && matches!(&f.payload[..], [] | [0x03, 0xe8]),
            _ => false,
        };
        if !ok {
            return Err(format!("unexpected server frame {f:x?} at {i}"));
        }
    }
    let sent_close = frames.last().is_some_and(|f| f.first == 0x88);
    if sent_close != out.events.contains(&Event::Close) {
        return Err("a close is answered exactly when one arrived".into());
    }
    Ok(())
}

fn kind(e: &Event) -> &'static str {
    match e {
        Event::Text(_) => "text",
        Event::Binary(_) => "binary",
        Event::Close => "close",
    }
}

/// A short description of an outcome for reports.
pub fn brief(o: &Outcome) -> String {
    let events: Vec<String> = o
        .events
        .iter()
        .map(|e| match e {
            Event::Text(t) => format!("text({} bytes)", t.len()),
            Event::Binary(b) => format!("binary({} bytes)", b.len()),
            Event::Close => "close".into(),
        })
        .collect();
    format!(
        "[{}], end {:?}, {} bytes queued, closed {}",
        events.join(", "),
        o.end,
        o.tx.len(),
        o.closed
    )
}

/// Which behaviour an input showed: kinds of messages, the error, closing.
fn signature(o: &Outcome) -> u64 {
    let mut sig = hash(format!("{:?}{}", o.end, o.closed).as_bytes());
    for e in o.events.iter().take(6) {
        sig = mix(sig, hash(kind(e).as_bytes()));
    }
    mix(sig, o.events.len().min(8) as u64)
}
