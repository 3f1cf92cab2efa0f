//! Generic byte mutations in the manner of AFL's havoc stage: bit flips, byte
//! inserts and deletes, repeats, splices with other corpus entries, interesting
//! integers and dictionary tokens. Targets add structural mutations of their own.

use crate::rng::Rng;

/// Inputs never grow past this (large enough for a 64-bit-length WebSocket frame).
pub const INPUT_BYTES_MAX: usize = 128 * 1024;

/// Values that sit on boundaries: lengths around 125/126/127, 16- and 64-bit
/// edges, sign bits.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x7e,
    0x7f,
    0x80,
    0xff,
    125,
    126,
    127,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Applies one to eight random mutations to `input`.
pub fn havoc(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    let rounds = 1 << rng.below(4);
    for _ in 0..rounds {
        one(rng, input, corpus, dict);
    }
    input.truncate(INPUT_BYTES_MAX);
}

// Long: one arm per mutation, the havoc table in one place.
fn one(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    let len = input.len();
    match rng.below(13) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.byte();
        }
        2 if len > 0 => {
            let i = rng.below(len);
            input[i] = input[i].wrapping_add(rng.below(70) as u8).wrapping_sub(35);
        }
        3 => {
            let at = rng.below(len + 1);
            let n = rng.size(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            input.splice(at..at, bytes);
        }
        4 if len > 0 => {
            let (a, b) = range(rng, len);
            input.drain(a..b);
        }
        5 if len > 0 => {
            // Repeat a range: builds deep nesting, many headers, many frames.
            let (a, b) = range(rng, len);
            let piece = input[a..b].to_vec();
            let times = rng.size(64);
            let at = rng.below(len + 1);
            let rep: Vec<u8> = piece
                .iter()
                .copied()
                .cycle()
                .take(piece.len() * times)
                .collect();
            input.splice(at..at, rep);
        }
        6 if !corpus.is_empty() => {
            let other = rng.pick(corpus);
            if !other.is_empty() {
                let (a, b) = range(rng, other.len());
                let at = rng.below(len + 1);
                if rng.one_in(2) {
                    input.truncate(at);
                }
                input.splice(at..at, other[a..b].iter().copied());
            }
        }
        7 => interesting(rng, input),
        8 | 9 if !dict.is_empty() => {
            let token = *rng.pick(dict);
            let at = rng.below(len + 1);
            if rng.one_in(3) && at + token.len() <= len {
                input[at..at + token.len()].copy_from_slice(token);
            } else {
                input.splice(at..at, token.iter().copied());
            }
        }
        10 if len > 0 => input.truncate(rng.below(len)),
        11 if len > 1 => {
            // Swap two bytes.
            let (a, b) = (rng.below(len), rng.below(len));
            input.swap(a, b);
        }
        _ => {
            let at = rng.below(len + 1);
            input.insert(at, rng.byte());
        }
    }
}

/// Writes an interesting value as 1, 2, 4 or 8 bytes, either endianness.
fn interesting(rng: &mut Rng, input: &mut Vec<u8>) {
    let v = *rng.pick(INTERESTING);
    let v = if rng.one_in(4) {
        v.wrapping_add(rng.below(3) as u64).wrapping_sub(1)
    } else {
        v
    };
    let width = 1 << rng.below(4);
    let be = v.to_be_bytes();
    let mut bytes = be[8 - width..].to_vec();
    if rng.one_in(3) {
        bytes.reverse();
    }
    let at = rng.below(input.len() + 1);
    let end = (at + width).min(input.len());
    input.splice(at..end, bytes);
}

/// A random non-empty range `a..b` of `0..len` (`len` > 0), mostly short.
pub fn range(rng: &mut Rng, len: usize) -> (usize, usize) {
    let a = rng.below(len);
    let n = rng.size(len - a);
    (a, a + n)
}
