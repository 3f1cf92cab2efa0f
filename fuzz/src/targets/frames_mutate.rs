//! JSON structure mutations for the `frames` target: the input, when it is JSON,
//! is changed as a tree (values swapped for others of any type, strings at and
//! around each length limit, nesting added, keys added, removed or duplicated),
//! else byte mutations with JSON tokens.

use serde_json::{Map, Value};

use crate::mutate::{havoc, INPUT_BYTES_MAX};
use crate::rng::Rng;

const KEYS: &[&str] = &[
    "type",
    "id",
    "content",
    "session_id",
    "model_id",
    "metadata",
    "file_url",
    "after_seq",
    "file_id",
    "before_seq",
    "limit",
];

const TYPES: &[&str] = &[
    "user_message",
    "cancel",
    "resume",
    "help_request",
    "voice_message",
    "file_message",
    "admin_join",
    "admin_watch",
    "admin_message",
    "admin_leave",
    "history",
];

/// Bytes and characters that change meaning: escapes, surrogates, odd numbers.
pub const DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\\",
    b"\\\"",
    b"\\u0000",
    b"\\ud800",
    b"\\udc00",
    b"\\ud83d\\ude00",
    b"null",
    b"true",
    b"-0",
    b"1e400",
    b"-1e400",
    b"1E-400",
    b"18446744073709551615",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"0.5",
    b"{\"a\":",
    b"[[[[[[[[[[[[[[[[[",
    b"]]]]]]]]]]]]]]]]]",
    b"\"type\":\"user_message\",",
    b"\"type\":\"cancel\",",
    b"\"content\":\"x\",",
    b"\"session_id\":\"s\",",
    b"\"metadata\":{\"k\":[1,{\"a\":null}]},",
    b"\"id\":\"c1\",",
    b"\"file_url\":\"https://x\",",
    b"\xc3\xa9",
    b"\xf0\x9f\x98\x80",
    b"\xff",
];

pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let tree = serde_json::from_slice::<Value>(input).ok();
    match tree {
        Some(mut v) if !rng.one_in(3) => {
            for _ in 0..1 + rng.below(3) {
                let target = rng.below(count(&v));
                let mut seen = 0;
                visit(&mut v, target, &mut seen, &mut |node| change(rng, node));
            }
            *input = serde_json::to_vec(&v).unwrap_or_default();
            if rng.one_in(4) {
                duplicate_key(rng, input);
            }
            input.truncate(INPUT_BYTES_MAX);
        }
        _ => havoc(rng, input, corpus, DICT),
    }
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Object(o) => o.values().map(count).sum(),
        Value::Array(a) => a.iter().map(count).sum(),
        _ => 0,
    }
}

/// Calls `f` on the `target`-th node in pre-order.
fn visit(v: &mut Value, target: usize, seen: &mut usize, f: &mut dyn FnMut(&mut Value)) -> bool {
    if *seen == target {
        f(v);
        return true;
    }
    *seen += 1;
    let children: Vec<&mut Value> = match v {
        Value::Object(o) => o.values_mut().collect(),
        Value::Array(a) => a.iter_mut().collect(),
        _ => return false,
    };
    children.into_iter().any(|c| visit(c, target, seen, f))
}

fn change(rng: &mut Rng, node: &mut Value) {
    match rng.below(8) {
        0 => *node = scalar(rng),
        1 => *node = Value::String(string(rng)),
        2 => *node = Value::Array(vec![node.take()]),
        3 => {
            let mut o = Map::new();
            o.insert((*rng.pick(KEYS)).into(), node.take());
            *node = Value::Object(o);
        }
        4 => {
            if let Value::Object(o) = node {
                let key = if rng.one_in(2) {
                    (*rng.pick(KEYS)).to_owned()
                } else {
                    string(rng)
                };
                let value = if key == "type" {
                    Value::String((*rng.pick(TYPES)).into())
                } else {
                    scalar(rng)
                };
                o.insert(key, value);
            }
        }
        5 => {
            if let Value::Object(o) = node {
                let keys: Vec<String> = o.keys().cloned().collect();
                if !keys.is_empty() {
                    o.remove(rng.pick(&keys));
                }
            }
        }
        6 => *node = Value::String((*rng.pick(TYPES)).into()),
        _ => {
            if let Value::Array(a) = node {
                let copy = a.first().cloned().unwrap_or(Value::Null);
                a.push(copy);
            }
        }
    }
}

fn scalar(rng: &mut Rng) -> Value {
    match rng.below(7) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 => Value::from(*rng.pick(&[0i64, -1, 1, 7, i64::MIN, i64::MAX])),
        3 => Value::from(*rng.pick(&[0u64, u64::MAX, 1 << 53])),
        4 => Value::from(*rng.pick(&[0.5f64, -0.0, 1e300, 1.0, 5e-324])),
        5 => Value::Object(Map::new()),
        _ => Value::Array(Vec::new()),
    }
}

/// Strings at and around the limits, of characters of every UTF-8 length.
fn string(rng: &mut Rng) -> String {
    let len = match rng.below(4) {
        0 => *rng.pick(&[
            0usize, 1, 10, 11, 32, 33, 64, 65, 128, 129, 2048, 2049, 8000, 8001,
        ]),
        1 => rng.size(100),
        _ => rng.below(12),
    };
    let c = *rng.pick(&[
        'a', 'Z', '0', '-', '_', ' ', '\t', 'é', '€', '😀', '\0', '"', '\\', '\u{feff}',
    ]);
    let mut s: String = std::iter::repeat_n(c, len).collect();
    if rng.one_in(4) {
        let prefix = ["https://", "http://", "s-"][rng.below(3)];
        s.insert_str(0, prefix);
    }
    s
}

/// Inserts a second copy of some `"key":value,` right after the first `{`.
fn duplicate_key(rng: &mut Rng, input: &mut Vec<u8>) {
    let Some(at) = input.iter().position(|&b| b == b'{') else {
        return;
    };
    let key = *rng.pick(KEYS);
    let value = match key {
        "type" => format!("\"{}\"", rng.pick(TYPES)),
        _ => serde_json::to_string(&Value::String(string(rng))).unwrap_or_default(),
    };
    let pair = format!("\"{key}\":{value},");
    input.splice(at + 1..at + 1, pair.into_bytes());
}
