//! The codec's round trip and structural mutations.
//!
//! [`round_trip`] reads any input as a program: messages (text with multi-byte
//! characters, binary), fragmented at random points (characters cut in two), with
//! pings between fragments, random masks, shortest and longer length forms, the
//! server sending text or starting the close between reads, then the peer's close
//! and frames after it. The codec must return exactly those messages, queue
//! exactly the server's frames, the pongs and the close answer, and ignore what
//! follows a close (data after the server's, everything after the peer's).

use chatbox::runtime::ws::codec::Limits;

use super::codec::{brief, run, Action, Event, Outcome, ROOMY, SMALL};
use crate::mutate::{havoc, range, INPUT_BYTES_MAX};
use crate::rng::{hash, Rng};
use crate::ws::{self, LenForm};

/// Reads a program from the input; zeros once it is used up.
struct Source<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Source<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn mask(&mut self) -> [u8; 4] {
        match self.byte() % 4 {
            0 => [0; 4],
            _ => [self.byte(), self.byte(), self.byte(), self.byte()],
        }
    }

    fn form(&mut self) -> LenForm {
        match self.byte() % 8 {
            0 => LenForm::U16,
            1 => LenForm::U64,
            _ => LenForm::Shortest,
        }
    }
}

/// Characters of every UTF-8 length, and the edges of the ranges.
const CHARS: &[char] = &[
    'a',
    ' ',
    '"',
    '\0',
    '\u{7f}',
    '\u{80}',
    'é',
    '\u{7ff}',
    '\u{800}',
    '€',
    '\u{ffff}',
    '\u{10000}',
    '😀',
    '\u{10ffff}',
];

/// What the program sends and what the codec must make of it.
struct Plan {
    limits: Limits,
    wire: Vec<u8>,
    events: Vec<Event>,
    tx: Vec<u8>,
    actions: Vec<(usize, Action)>,
    /// The server sent its close: data is skipped and pings go unanswered.
    server_closed: bool,
}

impl Plan {
    fn message(&mut self, s: &mut Source) {
        let text = s.byte() & 1 == 0;
        // Mostly short; now and then at the length-form edges or long.
        let len = match s.byte() % 32 {
            0 => 0,
            1..=26 => usize::from(s.byte()),
            27 => *[125, 126, 127, 0xffff, 0x1_0000]
                .get(usize::from(s.byte() % 5))
                .unwrap_or(&0),
            28..=30 => usize::from(s.u16()),
            _ => 0x1_0000 + usize::from(s.u16()),
        }
        .min(self.limits.message_bytes_max as usize);
        let mut rng = Rng::new(u64::from(s.u16()));
        let payload = if text {
            let mut t = String::new();
            while t.len() < len {
                let c = *rng.pick(CHARS);
                if t.len() + c.len_utf8() > len {
                    break;
                }
                t.push(c);
            }
            t.into_bytes()
        } else {
            (0..len).map(|_| rng.byte()).collect()
        };
        let pieces = self.pieces(&mut rng, payload.len(), 1 + usize::from(s.byte() % 4));
        let mut at = 0;
        for (i, &n) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let opcode = match (i, text) {
                (0, true) => 0x01,
                (0, false) => 0x02,
                _ => 0x00,
            };
            let first = opcode | if last { 0x80 } else { 0 };
            let (mask, form) = (s.mask(), s.form());
            ws::encode(
                &mut self.wire,
                first,
                &payload[at..at + n],
                Some(mask),
                form,
            );
            at += n;
            if !last && s.byte() % 4 == 0 {
                self.ping(s);
            }
        }
        if self.server_closed {
            return;
        }
        self.events.push(match text {
            // Built from whole characters: it is UTF-8.
            true => Event::Text(String::from_utf8(payload).unwrap_or_default()),
            false => Event::Binary(payload),
        });
    }

    /// One more than the longest control payload: 125 bytes, or the frame limit.
    fn control_max(&self) -> usize {
        126.min(self.limits.frame_bytes_max as usize + 1)
    }

    /// Fragment sizes: `count` pieces, more when a piece would pass the frame limit.
    fn pieces(&self, rng: &mut Rng, len: usize, count: usize) -> Vec<usize> {
        let frame_max = self.limits.frame_bytes_max as usize;
        let mut pieces = Vec::new();
        let mut left = len;
        for _ in 1..count {
            let n = rng.below(left.min(frame_max) + 1);
            pieces.push(n);
            left -= n;
        }
        while left > frame_max {
            pieces.push(frame_max);
            left -= frame_max;
        }
        pieces.push(left);
        pieces
    }

    /// A ping, when its pong fits the write limit (else the codec would rightly
    /// fail with `WriteFull`).
    fn ping(&mut self, s: &mut Source) {
        let payload = vec![s.byte(); usize::from(s.byte()) % self.control_max()];
        let answered = !self.server_closed;
        if answered && self.tx.len() + payload.len() > self.limits.tx_bytes_max as usize {
            return;
        }
        let (mask, form) = (s.mask(), s.form());
        ws::encode(&mut self.wire, 0x89, &payload, Some(mask), form);
        if answered {
            ws::encode(&mut self.tx, 0x8a, &payload, None, LenForm::Shortest);
        }
    }

    /// The server sends a text message (when it fits the write limit), or starts
    /// the closing handshake (a close always fits).
    fn server(&mut self, s: &mut Source) {
        let offset = self.wire.len();
        if s.byte() % 4 == 0 {
            if !self.server_closed {
                self.server_closed = true;
                ws::encode(&mut self.tx, 0x88, b"\x03\xe9bye", None, LenForm::Shortest);
                self.actions.push((offset, Action::Close));
            }
            return;
        }
        let text = "x".repeat(usize::from(s.byte()));
        if self.tx.len() + text.len() > self.limits.tx_bytes_max as usize {
            return;
        }
        if !self.server_closed {
            // Ignored after our close: nothing but the close may follow it.
            ws::encode(&mut self.tx, 0x81, text.as_bytes(), None, LenForm::Shortest);
        }
        self.actions.push((offset, Action::Text(text)));
    }

    fn pong(&mut self, s: &mut Source) {
        let payload = vec![s.byte(); usize::from(s.byte()) % self.control_max()];
        let (mask, form) = (s.mask(), s.form());
        ws::encode(&mut self.wire, 0x8a, &payload, Some(mask), form);
    }

    /// A close (code and reason, or empty) and valid frames after it.
    fn close(&mut self, s: &mut Source) {
        let echo: &[u8] = &[0x03, 0xe8];
        let answered = !self.server_closed;
        if answered && self.tx.len() + echo.len() > self.limits.tx_bytes_max as usize {
            return;
        }
        let code = *[1000u16, 1001, 1003, 1011, 3000, 4999]
            .get(usize::from(s.byte() % 7))
            .unwrap_or(&0);
        let mut payload = Vec::new();
        if code != 0 {
            payload.extend_from_slice(&code.to_be_bytes());
            let reason: String = CHARS
                .iter()
                .cycle()
                .take(usize::from(s.byte() % 40))
                .collect();
            // A control payload (code and reason) is at most 125 bytes and one frame.
            let fits = reason.char_indices().map(|(i, c)| i + c.len_utf8());
            let cut = fits
                .take_while(|&end| end < self.control_max() - 2)
                .last()
                .unwrap_or(0);
            payload.extend_from_slice(&reason.as_bytes()[..cut]);
        }
        let (mask, form) = (s.mask(), s.form());
        ws::encode(&mut self.wire, 0x88, &payload, Some(mask), form);
        if answered {
            let answer = if code == 0 { &[][..] } else { echo };
            ws::encode(&mut self.tx, 0x88, answer, None, LenForm::Shortest);
        }
        self.events.push(Event::Close);
        for _ in 0..s.byte() % 3 {
            ws::encode(
                &mut self.wire,
                0x81,
                b"after",
                Some(s.mask()),
                LenForm::Shortest,
            );
        }
    }
}

/// Runs the input as a program of valid frames; see the module comment.
pub fn round_trip(input: &[u8]) -> Result<(), String> {
    let mut s = Source {
        bytes: input,
        at: 0,
    };
    let limits = if s.byte() & 1 == 0 { SMALL } else { ROOMY };
    let mut plan = Plan {
        limits,
        wire: Vec::new(),
        events: Vec::new(),
        tx: Vec::new(),
        actions: Vec::new(),
        server_closed: false,
    };
    let mut steps = 0;
    while !s.done() && steps < 64 && plan.wire.len() < INPUT_BYTES_MAX {
        steps += 1;
        match s.byte() % 10 {
            0..=4 => plan.message(&mut s),
            5 | 6 => plan.ping(&mut s),
            7 => plan.pong(&mut s),
            _ => plan.server(&mut s),
        }
    }
    plan.close(&mut s);
    let want = Outcome {
        closed: plan.events.last() == Some(&Event::Close),
        events: plan.events,
        end: None,
        tx: plan.tx,
    };
    let mut rng = Rng::new(hash(input));
    let mut cuts = Vec::new();
    let mut left = plan.wire.len();
    while left > 0 {
        let n = rng.size(512).min(left);
        cuts.push(n);
        left -= n;
    }
    for cuts in [Vec::new(), cuts] {
        let got = run(&plan.wire, &cuts, limits, &plan.actions)?;
        if got != want {
            return Err(format!(
                "round trip with {limits:?} in chunks {cuts:?}: wanted {}, got {} (first difference at event {})",
                brief(&want),
                brief(&got),
                want.events.iter().zip(&got.events).take_while(|(a, b)| a == b).count()
            ));
        }
    }
    Ok(())
}

/// Tokens for the generic mutations: frame starts, lengths, close codes, UTF-8
/// edges (a lone continuation byte, a surrogate, past U+10FFFF).
pub const DICT: &[&[u8]] = &[
    &[0x81, 0x80],
    &[0x82, 0x80],
    &[0x01, 0x80],
    &[0x00, 0x80],
    &[0x80, 0x80],
    &[0x88, 0x80],
    &[0x89, 0x80],
    &[0x8a, 0x80],
    &[0xfe],
    &[0xff],
    &[0xff, 0xff],
    &[0x03, 0xe8],
    &[0x03, 0xed],
    &[0x0b, 0xb8],
    &[0xc3],
    &[0xa9],
    &[0xf0, 0x9f],
    &[0x98, 0x80],
    &[0xed, 0xa0, 0x80],
    &[0xf4, 0x90, 0x80, 0x80],
];

/// Structural mutations on the frames found in the input, else generic ones.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let spans = ws::walk(input);
    if spans.is_empty() || rng.one_in(3) {
        havoc(rng, input, corpus, DICT);
        return;
    }
    let f = *rng.pick(&spans);
    let end = f.end.min(input.len());
    let payload = ws::unmask(&input[f.payload..end], f.mask);
    let first = input[f.start];
    let frame_bytes = |first: u8, payload: &[u8], rng: &mut Rng| {
        let mut out = Vec::new();
        let mask = Some([rng.byte(), rng.byte(), rng.byte(), rng.byte()]);
        ws::encode(&mut out, first, payload, mask, *rng.pick(&FORMS));
        out
    };
    let replacement = match rng.below(7) {
        0 => {
            input[f.start] ^= *rng.pick(&[0x80, 0x40, 0x20, 0x10]);
            return;
        }
        1 => {
            let op = *rng.pick(&[0u8, 1, 2, 3, 7, 8, 9, 10, 11, 15]);
            input[f.start] = (first & 0xf0) | op;
            return;
        }
        2 => {
            // A length that does not match the payload that follows.
            let len = rng
                .pick(&LENGTHS)
                .wrapping_add(payload.len() as u64 * rng.below(2) as u64);
            let head = ws::header(first, len, f.mask, *rng.pick(&FORMS));
            input.splice(f.start..f.payload, head);
            return;
        }
        3 if !payload.is_empty() => {
            // The same payload, fragmented in two.
            let cut = rng.below(payload.len());
            let mut out = frame_bytes(first & 0x0f, &payload[..cut], rng);
            out.extend(frame_bytes(first & 0x80, &payload[cut..], rng));
            out
        }
        4 => {
            let op = *rng.pick(&[0x88u8, 0x89, 0x8a, 0x81, 0x00, 0x80]);
            let mut out = frame_bytes(op, &payload[..payload.len().min(125)], rng);
            out.extend_from_slice(&input[f.start..end]);
            out
        }
        5 => {
            let mut out = input[f.start..end].to_vec();
            out.extend_from_slice(&input[f.start..end]);
            out
        }
        _ => {
            let (a, b) = range(rng, payload.len().max(1));
            let mut p = payload.clone();
            p.truncate(b.min(p.len()));
            p.drain(..a.min(p.len()));
            frame_bytes(first, &p, rng)
        }
    };
    input.splice(f.start..end, replacement);
    input.truncate(INPUT_BYTES_MAX);
}

const FORMS: [LenForm; 4] = [
    LenForm::Shortest,
    LenForm::Shortest,
    LenForm::U16,
    LenForm::U64,
];

const LENGTHS: [u64; 12] = [
    0,
    1,
    64,
    65,
    125,
    126,
    0xffff,
    0x1_0000,
    70_000,
    70_001,
    1 << 63,
    u64::MAX,
];
