//! Micro-benchmarks of the hot path: frame parse + validate (simd-json, as shipped,
//! against a serde_json baseline doing the same validation), seal/open, JWT
//! verification, the rate limiter, a cross-core hop on the mesh's queue type, and
//! the front door's routing of an upgrade. Run: `cargo bench --bench hot_path`.

use std::hint::black_box;

use chatbox::app::frames::{self, Limits};
use chatbox::auth::{mint, now_secs, Claims, Verifier};
use chatbox::crypto::{KeyRing, Place};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SMALL: &str = r#"{"type":"user_message","id":"c-123","session_id":"s_0123456789abcdef01234567","content":"Hello, I cannot log in to my account since this morning. Can you help?"}"#;

fn large() -> String {
    let content = "My order #12345 arrived damaged; the box was crushed and two items are broken. "
        .repeat(40);
    format!(
        r#"{{"type":"user_message","id":"c-124","session_id":"s_0123456789abcdef01234567","content":"{content}","metadata":{{"page":"/orders/12345","locale":"en-GB","tags":["damaged","refund"]}}}}"#
    )
}

/// The baseline: the same fields and limits checked on a serde_json `Value`.
fn serde_json_parse(text: &str, limits: &Limits) -> Result<(Option<String>, String), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| "not JSON".to_string())?;
    let obj = v.as_object().ok_or("not an object")?;
    let id = obj.get("id").and_then(|v| v.as_str()).map(str::to_owned);
    if obj.get("type").and_then(|t| t.as_str()) != Some("user_message") {
        return Err("type".into());
    }
    let content = obj
        .get("content")
        .and_then(|c| c.as_str())
        .ok_or("content")?;
    if content.chars().count() > limits.content_chars_max {
        return Err("too long".into());
    }
    if let Some(s) = obj.get("session_id").and_then(|s| s.as_str()) {
        if s.len() > 128
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("session_id".into());
        }
    }
    if let Some(m) = obj.get("metadata") {
        if serde_json::to_string(m).map_err(|e| e.to_string())?.len() > limits.metadata_bytes_max {
            return Err("metadata".into());
        }
    }
    Ok((id, content.to_owned()))
}

fn parse(c: &mut Criterion) {
    let limits = Limits::default();
    let large = large();
    for (name, text) in [("small", SMALL), ("large", large.as_str())] {
        let mut g = c.benchmark_group(format!("frame_parse_validate/{name}"));
        g.throughput(Throughput::Bytes(text.len() as u64));
        let mut scratch = Vec::new();
        let mut buffers = simd_json::Buffers::default();
        g.bench_function("simd_json", |b| {
            b.iter(|| frames::parse(black_box(text), &limits, &mut scratch, &mut buffers).unwrap())
        });
        g.bench_function("serde_json", |b| {
            b.iter(|| serde_json_parse(black_box(text), &limits).unwrap())
        });
        g.finish();
    }
}

fn seal_open(c: &mut Criterion) {
    let keys = KeyRing::new(&"42".repeat(32), &[]).unwrap();
    let text = "Hello, I cannot log in to my account since this morning. Can you help?".repeat(4);
    let at = Place {
        session_id: "s_1",
        message_id: "m_1",
        role: "user",
        author: "u_1",
        seq: 1,
    };
    let mut g = c.benchmark_group("crypto");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("seal_280B", |b| b.iter(|| keys.seal(&at, black_box(&text))));
    let sealed = keys.seal(&at, &text);
    g.bench_function("open_280B", |b| {
        b.iter(|| keys.open(&at, black_box(&sealed)).unwrap())
    });
    g.finish();
}

fn jwt(c: &mut Criterion) {
    let secret = b"bench-secret-0123456789abcdef0123456789";
    let token = mint(
        secret,
        &Claims {
            sub: "user-1".into(),
            name: Some("Ann".into()),
            roles: vec![],
            exp: now_secs() + 3600,
        },
    );
    let v = Verifier::new(secret);
    c.bench_function("jwt_verify_hs256", |b| {
        b.iter(|| v.verify(black_box(&token)).unwrap())
    });
}

fn rate_limiter(c: &mut Criterion) {
    use chatbox::limiter::Limiter;
    use std::sync::Arc;
    let mut g = c.benchmark_group("rate_limiter");
    // A user already known, refilled between calls (the common case).
    let mut l = Limiter::new(1_000_000, 100_000);
    let user: Arc<str> = "user-1".into();
    let mut now = 0i64;
    g.bench_function("known_user", |b| {
        b.iter(|| {
            now += 1;
            l.check(black_box(&user), now).unwrap()
        })
    });
    // A stream of new users into a full map (the bound at work).
    let mut l = Limiter::new(60, 1_000);
    let users: Vec<Arc<str>> = (0..10_000).map(|i| format!("u{i}").into()).collect();
    let mut i = 0;
    g.bench_function("new_users_at_capacity", |b| {
        b.iter(|| {
            i += 1;
            let _ = l.check(&users[i % users.len()], i as i64);
        })
    });
    g.finish();
}

/// The mesh's queue between two threads: a message there and a reply back.
fn cross_core_hop(c: &mut Criterion) {
    let (to_b, at_b) = async_channel::bounded::<u64>(64);
    let (to_a, at_a) = async_channel::bounded::<u64>(64);
    let peer = std::thread::spawn(move || {
        while let Ok(v) = at_b.recv_blocking() {
            if to_a.send_blocking(v + 1).is_err() {
                break;
            }
        }
    });
    c.bench_function("cross_core_round_trip", |b| {
        b.iter(|| {
            to_b.send_blocking(black_box(1)).unwrap();
            at_a.recv_blocking().unwrap()
        })
    });
    drop(to_b);
    let _ = peer.join();
}

/// The front door's decision for one upgrade: parse the head, check origin and JWT.
fn router(c: &mut Criterion) {
    use chatbox::runtime::http::head::Head;
    use chatbox::runtime::ws::handshake::{check, Route};
    let secret = b"bench-secret-0123456789abcdef0123456789";
    let token = mint(
        secret,
        &Claims {
            sub: "user-1".into(),
            name: None,
            roles: vec![],
            exp: now_secs() + 3600,
        },
    );
    let raw = format!(
        "GET /chatbox/ws HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Origin: https://chat.example\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let v = Verifier::new(secret);
    let peer: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let origins = vec!["https://chat.example".to_string()];
    c.bench_function("upgrade_route_and_check", |b| {
        b.iter(|| {
            let head = Head::parse(black_box(raw.as_bytes())).unwrap().unwrap();
            check(&head, raw.as_bytes(), Route::Chat, &v, &origins, peer).unwrap()
        })
    });
}

criterion_group!(
    benches,
    parse,
    seal_open,
    jwt,
    rate_limiter,
    cross_core_hop,
    router
);
criterion_main!(benches);
