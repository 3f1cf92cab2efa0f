//! Target `head`: the HTTP request-head reader (src/runtime/http/head.rs
//! `Head::parse`).
//!
//! Oracles beyond "does not panic": a complete head's `len` is within the input and
//! parsing just those bytes gives the same head (what follows is body or frames);
//! parsing prefixes, as `read_head` does while bytes arrive, agrees with parsing
//! the whole: a prefix is incomplete, or the same complete head, or an error that
//! more bytes do not cure; the path has no query and kept values are trimmed.

use chatbox::runtime::http::head::{Head, HeadError};

use crate::mutate::havoc;
use crate::rng::{hash, mix, Rng};

type Parsed = Result<Option<Head>, HeadError>;

pub fn check(input: &[u8]) -> Result<u64, String> {
    let whole = Head::parse(input);
    if let Ok(Some(h)) = &whole {
        check_head(input, h)?;
    }
    for cut in prefixes(input, &whole) {
        let part = Head::parse(&input[..cut]);
        agree(&part, &whole).map_err(|e| {
            format!(
                "prefix of {cut} bytes: {e} (prefix {}, whole {})",
                show(&part),
                show(&whole)
            )
        })?;
    }
    Ok(signature(&whole))
}

fn check_head(input: &[u8], h: &Head) -> Result<(), String> {
    if h.len == 0 || h.len > input.len() {
        return Err(format!("len {} for {} input bytes", h.len, input.len()));
    }
    let again = Head::parse(&input[..h.len]);
    if show(&again) != show(&Ok(Some(h.clone()))) {
        return Err(format!("its own {} bytes parse as {}", h.len, show(&again)));
    }
    if h.path.contains('?') {
        return Err(format!("path {:?} keeps its query", h.path));
    }
    let kept = [
        &h.host,
        &h.origin,
        &h.authorization,
        &h.upgrade,
        &h.connection,
        &h.ws_key,
        &h.ws_version,
    ];
    if kept
        .iter()
        .any(|v| v.as_deref().is_some_and(|v| v.trim() != v))
    {
        return Err(format!("an untrimmed value in {h:?}"));
    }
    Ok(())
}

/// Every prefix of a short input; of a long one, a sample and those around the
/// head's end.
fn prefixes(input: &[u8], whole: &Parsed) -> Vec<usize> {
    let n = input.len();
    if n <= 512 {
        return (0..n).collect();
    }
    let mut rng = Rng::new(hash(input));
    let mut cuts: Vec<usize> = (0..64).map(|_| rng.below(n)).collect();
    if let Ok(Some(h)) = whole {
        cuts.extend(
            [h.len.saturating_sub(1), h.len, h.len + 1]
                .into_iter()
                .filter(|&c| c < n),
        );
    }
    cuts
}

/// A prefix's result must be consistent with the whole input's.
fn agree(part: &Parsed, whole: &Parsed) -> Result<(), &'static str> {
    match (part, whole) {
        (Ok(None), Ok(Some(_)) | Err(_)) => Ok(()),
        (Ok(None), Ok(None)) => Ok(()),
        (Ok(Some(p)), Ok(Some(w))) if show(&Ok(Some(p.clone()))) == show(&Ok(Some(w.clone()))) => {
            Ok(())
        }
        (Ok(Some(_)), _) => Err("a complete prefix disagrees with the whole"),
        (Err(_), Err(_)) => Ok(()),
        (Err(_), _) => Err("more bytes cured an error"),
    }
}

fn show(p: &Parsed) -> String {
    match p {
        Ok(Some(h)) => format!("{h:?}"),
        Ok(None) => "incomplete".into(),
        Err(e) => format!("error {e}"),
    }
}

/// Which behaviour an input showed: complete (and which fields it had),
/// incomplete, or the kind of error.
fn signature(p: &Parsed) -> u64 {
    match p {
        Ok(Some(h)) => {
            let fields = [
                h.query.is_some(),
                h.http11,
                h.host.is_some(),
                h.origin.is_some(),
                h.authorization.is_some(),
                h.upgrade.is_some(),
                h.connection.is_some(),
                h.ws_key.is_some(),
                h.ws_version.is_some(),
            ];
            let bits = fields.iter().fold(0u64, |acc, &f| acc << 1 | u64::from(f));
            // The method only when it is a common one: every token is a method
            // to the parser, and each would count as a new behaviour.
            let methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"];
            let method = methods.iter().position(|m| *m == h.method);
            mix(method.map_or(99, |m| m as u64), bits)
        }
        Ok(None) => 1,
        Err(HeadError::Malformed(m)) => {
            let stem: String = m.split_whitespace().take(2).collect();
            hash(stem.as_bytes())
        }
        Err(e) => hash(format!("{e}").split(' ').next().unwrap_or("").as_bytes()),
    }
}

/// Request-line and header tokens, line endings of every kind, folded lines.
pub const DICT: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b": ",
    b":",
    b" ",
    b"\t",
    b"\r\n ",
    b"GET ",
    b"POST ",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b" HTTP/2.0",
    b"/chatbox/ws?token=a%2Bb",
    b"?",
    b"%",
    b"Host: h\r\n",
    b"Origin: https://o\r\n",
    b"Authorization: Bearer t\r\n",
    b"Upgrade: websocket\r\n",
    b"Connection: Upgrade\r\n",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    b"Sec-WebSocket-Version: 13\r\n",
    b"HOST: x\r\n",
    b"X: y\r\n",
    b"\xc3\xa9",
    b"\xff",
    b"\x00",
    b"\x7f",
];

/// Line-level mutations (repeat, drop or swap header lines), else byte ones.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let lines: Vec<&[u8]> = input.split_inclusive(|&b| b == b'\n').collect();
    if lines.len() < 3 || rng.one_in(2) {
        havoc(rng, input, corpus, DICT);
        return;
    }
    let mut lines: Vec<Vec<u8>> = lines.into_iter().map(<[u8]>::to_vec).collect();
    // The request line and the blank line stay where they are.
    let i = 1 + rng.below(lines.len() - 2);
    match rng.below(4) {
        0 => {
            let copies = rng.size(70);
            let line = lines[i].clone();
            lines.splice(i..i, std::iter::repeat_n(line, copies));
        }
        1 => {
            lines.remove(i);
        }
        2 => {
            let j = 1 + rng.below(lines.len() - 2);
            lines.swap(i, j);
        }
        _ => {
            let line = &mut lines[i];
            let at = line.iter().position(|&b| b == b':').map_or(0, |c| c + 1);
            let long = vec![*rng.pick(&[b'a', b' ', b'\t', 0xe9]); rng.size(9000)];
            line.splice(at..at, long);
        }
    }
    *input = lines.concat();
}
