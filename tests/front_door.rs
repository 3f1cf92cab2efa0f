//! The front door: HTTP endpoints, limits, and every way an upgrade is refused.

mod common;

use chatbox::auth::now_secs;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_and_json_404() {
    let server = start(config());
    let addr = server.local_addr();
    let (s, h, b) = get(addr, "/chatbox/healthz").await;
    assert_eq!((s, b.as_str()), (200, r#"{"status":"ok"}"#));
    assert!(h.contains("content-type: application/json"), "{h}");
    let (s, _, b) = get(addr, "/chatbox/readyz").await;
    assert_eq!((s, b.as_str()), (200, r#"{"status":"ready"}"#));
    let (s, h, b) = get(addr, "/chatbox/metrics").await;
    assert_eq!(s, 200);
    assert!(h.contains("text/plain; version=0.0.4"), "{h}");
    assert!(
        b.contains("chatbox_ws_connections_open{core=\"1\"} 0"),
        "{b}"
    );
    assert!(
        b.contains("chatbox_refused_total{reason=\"too_many_connections\"}"),
        "{b}"
    );
    for path in ["/chatbox/nope", "/elsewhere", "/chatbox"] {
        let (s, h, b) = get(addr, path).await;
        assert_eq!(s, 404, "{path}");
        assert!(h.contains("application/json"));
        assert_eq!(error_code(&b), "not_found");
    }
    let (s, h, b) = http(
        addr,
        "POST /chatbox/healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!((s, error_code(&b).as_str()), (405, "method_not_allowed"));
    assert!(h.contains("allow: get"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_token() {
    let server = start(chatbox::Config {
        metrics_token: Some("scrape-me".into()),
        ..config()
    });
    let addr = server.local_addr();
    let (s, _, b) = get(addr, "/chatbox/metrics").await;
    assert_eq!((s, error_code(&b).as_str()), (401, "unauthorized"));
    let (s, _, b) = http(
        addr,
        "GET /chatbox/metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer scrape-me\r\n\r\n",
    )
    .await;
    assert_eq!(s, 200);
    assert!(b.contains("chatbox_panics_total 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_malformed_and_slow_heads_are_refused() {
    let server = start(chatbox::Config {
        http_head_timeout_ms: 200,
        http_request_timeout_ms: 200,
        ..config()
    });
    let addr = server.local_addr();
    let big = format!(
        "GET /chatbox/healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (s, _, b) = http(addr, &big).await;
    assert_eq!((s, error_code(&b).as_str()), (431, "head_too_large"));
    let (s, _, b) = http(addr, "BLAH\x01 / nonsense\r\n\r\n").await;
    assert_eq!((s, error_code(&b).as_str()), (400, "bad_request"));
    // A head that never completes gets 408 once the head deadline passes.
    let (s, _, b) = http(addr, "GET /chatbox/healthz HTTP/1.1\r\nHost: x\r\n").await;
    assert_eq!((s, error_code(&b).as_str()), (408, "timeout"));
    assert_eq!(
        total(&server, |m| m
            .refused_count(chatbox::metrics::Refusal::HeadTimeout)),
        1
    );
    let (s, _, b) = http(
        addr,
        "POST /chatbox/healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
    )
    .await;
    assert_eq!((s, error_code(&b).as_str()), (413, "payload_too_large"));
    // The server is unharmed.
    assert_eq!(get(addr, "/chatbox/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix() {
    let server = start(config());
    let addr = server.local_addr();
    let exp = now_secs() + 3600;
    let secret = EncodingKey::from_secret(SECRET.as_bytes());
    let claims = serde_json::json!({"sub": "u1", "exp": exp});
    let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &secret).unwrap();
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"x".repeat(40).as_slice()),
    )
    .unwrap();
    let no_exp = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "u1"}),
        &secret,
    )
    .unwrap();
    // alg=none and alg=RS256 headers over a valid HS256 body: the algorithm is pinned.
    let valid = token("u1");
    let body_and_sig = valid.split_once('.').unwrap().1;
    let alg_none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        body_and_sig.split_once('.').unwrap().0
    );
    let alg_rs256 = format!("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{body_and_sig}");
    let refused = [
        ("no token", None),
        ("garbage", Some("not.a.jwt".to_string())),
        ("expired", Some(token_with("u1", &[], now_secs() - 3600))),
        ("bad signature", Some(wrong_key)),
        ("alg none", Some(alg_none)),
        ("alg RS256", Some(alg_rs256)),
        ("alg HS512", Some(hs512)),
        ("no exp", Some(no_exp)),
    ];
    for (what, tok) in refused {
        let err = connect(addr, "/ws", tok.as_deref(), None)
            .await
            .map(|_| ())
            .expect_err(what);
        assert_eq!(refusal(err), (401, "unauthorized".to_string()), "{what}");
    }
    // Header and query parameter both work.
    let mut ws = connect(addr, "/ws", Some(&valid), None)
        .await
        .expect("bearer header");
    ws.close(None).await.ok();
    let ws = connect(addr, &format!("/ws?token={valid}"), None, None)
        .await
        .expect("token query");
    drop(ws);
    assert_eq!(
        total(&server, |m| m
            .refused_count(chatbox::metrics::Refusal::Unauthorized)),
        8
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_matrix() {
    let t = token("o1");
    // Empty list: non-browser clients and same-origin pages only.
    let server = start(config());
    let addr = server.local_addr();
    connect(addr, "/ws", Some(&t), None)
        .await
        .expect("no Origin: not a browser");
    connect(addr, "/ws", Some(&t), Some(&format!("http://{addr}")))
        .await
        .expect("same origin");
    let err = connect(addr, "/ws", Some(&t), Some("https://evil.example"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refusal(err), (403, "forbidden".into()));
    // An explicit list.
    let server = start(chatbox::Config {
        allowed_origins: vec!["https://app.example".into()],
        ..config()
    });
    let addr = server.local_addr();
    connect(addr, "/ws", Some(&t), Some("https://app.example"))
        .await
        .expect("listed origin");
    for bad in ["https://evil.example", "https://app.example.evil", "null"] {
        let err = connect(addr, "/ws", Some(&t), Some(bad))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(refusal(err), (403, "forbidden".into()), "{bad}");
    }
    // `*` opts in to all.
    let server = start(chatbox::Config {
        allowed_origins: vec!["*".into()],
        ..config()
    });
    connect(
        server.local_addr(),
        "/ws",
        Some(&t),
        Some("https://anything.example"),
    )
    .await
    .expect("*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_websocket_requests_to_ws_are_refused_cleanly() {
    let server = start(config());
    let addr = server.local_addr();
    let (s, h, b) = get(addr, "/chatbox/ws").await;
    assert_eq!((s, error_code(&b).as_str()), (426, "upgrade_required"));
    assert!(h.contains("upgrade: websocket"));
    let req =
        "GET /chatbox/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (s, h, _) = http(addr, req).await;
    assert_eq!(s, 426);
    assert!(h.contains("sec-websocket-version: 13"), "{h}");
    let req =
        "GET /chatbox/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n";
    let (s, _, b) = http(addr, req).await;
    assert_eq!((s, error_code(&b).as_str()), (400, "bad_request"));
}
