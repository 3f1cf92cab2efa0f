//! Live tokens: a connection lives until its token's `exp` (close 4001) unless the
//! client refreshes it with `auth_refresh`; `nbf`, issuer and audience are checked
//! at upgrade; an admin disconnects a user (close 4003), also when deleting them,
//! through percent-decoded paths, and hears 503 when the user's core cannot answer.
//!
//! Time is driven by short tokens (`exp` two seconds ahead) and a short keep-alive
//! period, whose sweep is what checks expiries; waits end on frames (the sweep's
//! pings, replies, close frames), not on sleeps.

mod common;

use std::sync::{mpsc, Arc, Mutex};

use chatbox::auth::now_secs;
use chatbox::clock::now_ms;
use chatbox::runtime::addr::AddrKey;
use chatbox::runtime::mesh::owner_core;
use chatbox::{Config, Hooks};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// The keep-alive sweep runs every 25 ms (a quarter of the ping interval); the pong
/// timeout is long so that a test busy elsewhere is not closed for it.
fn fast_sweep() -> Config {
    Config {
        ws_ping_interval_ms: 100,
        ws_pong_timeout_ms: 10_000,
        ..config()
    }
}

fn admin_token() -> String {
    token_with("boss", &["admin"], now_secs() + 3600)
}

fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The next message of any kind, pings included; `None` once the stream ends.
async fn raw_next(ws: &mut Ws) -> Option<Message> {
    match tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("message in time")
    {
        Some(Ok(m)) => Some(m),
        _ => None,
    }
}

/// Reads until the server's close frame, within [`WAIT`] in all (the keep-alive
/// pings would otherwise keep a wait for a close that never comes alive forever).
async fn close_frame(ws: &mut Ws) -> CloseFrame {
    let frame = async {
        loop {
            match next_msg(ws).await {
                Some(Message::Close(Some(f))) => return f,
                Some(Message::Close(None)) | None => panic!("closed without a close frame"),
                Some(_) => continue,
            }
        }
    };
    tokio::time::timeout(WAIT, frame)
        .await
        .expect("a close frame in time")
}

fn assert_closed_with(frame: &CloseFrame, code: u16, reason: &str) {
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::from(code), reason)
    );
}

/// A frame round trip: an unknown frame type is answered with one error.
async fn still_open(ws: &mut Ws) {
    send(ws, json!({"type": "nothing", "id": "probe"})).await;
    let v = recv(ws).await;
    assert_eq!(
        (v["type"].as_str(), v["id"].as_str()),
        (Some("error"), Some("probe"))
    );
}

async fn refresh(ws: &mut Ws, token: &str, id: &str) -> Value {
    send(
        ws,
        json!({"type": "auth_refresh", "token": token, "id": id}),
    )
    .await;
    recv(ws).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closes_with_4001_when_its_token_expires() {
    let server = start(fast_sweep());
    let addr = server.local_addr();
    let exp = now_secs() + 2;
    let mut ws = connect(addr, "/ws", Some(&token_with("shorty", &[], exp)), None)
        .await
        .unwrap();
    still_open(&mut ws).await;
    let frame = close_frame(&mut ws).await;
    assert_closed_with(&frame, 4001, "token expired");
    assert!(now_ms() >= exp as i64 * 1000, "closed before its exp");
    assert_eq!(total(&server, |m| m.tokens_expired.get()), 1);
    let (_, _, metrics) = get(addr, "/chatbox/metrics").await;
    assert!(
        metrics.contains("chatbox_ws_tokens_expired_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_keeps_the_connection_past_the_old_exp() {
    let server = start(fast_sweep());
    let addr = server.local_addr();
    let old_exp = now_secs() + 2;
    let mut ws = connect(
        addr,
        "/ws",
        Some(&token_with("renewer", &[], old_exp)),
        None,
    )
    .await
    .unwrap();
    let new_exp = now_secs() + 3600;
    let v = refresh(&mut ws, &token_with("renewer", &[], new_exp), "r1").await;
    assert_eq!(
        v,
        json!({"type": "auth_refreshed", "expires_at": new_exp, "id": "r1"})
    );

    // The sweep pings every ~100 ms of quiet; two pings that left after the old
    // exp (and 300 ms, a dozen sweeps, past it) prove that sweeps ran after it.
    let old_exp_ms = old_exp as i64 * 1000;
    let mut pings_after = 0;
    while pings_after < 2 || now_ms() < old_exp_ms + 300 {
        match raw_next(&mut ws).await {
            Some(Message::Ping(_)) if now_ms() > old_exp_ms => pings_after += 1,
            Some(Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("expected keep-alive pings, got {other:?}"),
        }
    }
    still_open(&mut ws).await;
    assert_eq!(total(&server, |m| m.tokens_expired.get()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_is_unauthorized_and_the_old_exp_still_applies() {
    let server = start(fast_sweep());
    let addr = server.local_addr();
    let exp = now_secs() + 2;
    let later = now_secs() + 3600;
    let mut user = connect(addr, "/ws", Some(&token_with("keeper", &[], exp)), None)
        .await
        .unwrap();
    let mut admin = connect(
        addr,
        "/ws",
        Some(&token_with("chief", &["admin"], exp)),
        None,
    )
    .await
    .unwrap();
    let unauthorized = |v: &Value, id: &str| {
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str(), v["id"].as_str()),
            (Some("error"), Some("unauthorized"), Some(id)),
            "{v}"
        );
    };
    let bad_signature = format!("{}x", token_with("keeper", &[], later));
    for (token, id) in [
        ("not-a-jwt".to_owned(), "garbage"),
        (bad_signature, "bad-signature"),
        (token_with("someone-else", &[], later), "other-sub"),
        (token_with("keeper", &[], now_secs() - 3600), "expired"),
    ] {
        unauthorized(&refresh(&mut user, &token, id).await, id);
    }
    let demoted = token_with("chief", &[], later);
    unauthorized(&refresh(&mut admin, &demoted, "demoted").await, "demoted");

    // A refresh cannot add a role the connection did not open with.
    let mut climber = connect_user(addr, "climber").await;
    let promoted = token_with("climber", &["admin"], later);
    assert_eq!(
        refresh(&mut climber, &promoted, "up").await["type"],
        "auth_refreshed"
    );
    send(
        &mut climber,
        json!({"type": "admin_join", "session_id": "s_x"}),
    )
    .await;
    assert_eq!(recv(&mut climber).await["code"], "forbidden");

    for ws in [&mut user, &mut admin] {
        assert_closed_with(&close_frame(ws).await, 4001, "token expired");
    }
    assert!(now_ms() >= exp as i64 * 1000);
    still_open(&mut climber).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_yet_valid_is_refused_at_upgrade() {
    let server = start(config());
    let addr = server.local_addr();
    let now = now_secs();
    let early = signed(json!({"sub": "eager", "exp": now + 3600, "nbf": now + 120}));
    let err = connect(addr, "/ws", Some(&early), None).await.unwrap_err();
    assert_eq!(refusal(err), (401, "unauthorized".to_owned()));
    let ready = signed(json!({"sub": "eager", "exp": now + 3600, "nbf": now}));
    connect(addr, "/ws", Some(&ready), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let server = start(Config {
        jwt_issuer: Some("https://id.example".into()),
        jwt_audience: Some("chatbox".into()),
        ..config()
    });
    let addr = server.local_addr();
    let exp = now_secs() + 3600;
    let good =
        json!({"sub": "u", "exp": exp, "iss": "https://id.example", "aud": ["web", "chatbox"]});
    connect(addr, "/ws", Some(&signed(good)), None)
        .await
        .unwrap();
    for claims in [
        json!({"sub": "u", "exp": exp, "iss": "https://id.example", "aud": "web"}),
        json!({"sub": "u", "exp": exp, "iss": "https://id.example"}),
        json!({"sub": "u", "exp": exp, "iss": "https://evil.example", "aud": "chatbox"}),
        json!({"sub": "u", "exp": exp, "aud": "chatbox"}),
    ] {
        let err = connect(addr, "/ws", Some(&signed(claims.clone())), None)
            .await
            .unwrap_err();
        assert_eq!(refusal(err), (401, "unauthorized".to_owned()), "{claims}");
    }
    // The admin API checks them too.
    let (status, _) = admin_call(addr, "GET", "/sessions", &admin_token()).await;
    assert_eq!(status, 401, "a token without iss and aud");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_disconnects_every_connection_of_a_user_with_4003() {
    let server = start(config());
    let addr = server.local_addr();
    let mut talker = [
        connect_user(addr, "talker").await,
        connect_user(addr, "talker").await,
    ];
    let mut bystander = connect_user(addr, "bystander").await;
    let (status, v) = admin_call(addr, "POST", "/users/talker/disconnect", &admin_token()).await;
    assert_eq!((status, v), (200, json!({"closed": 2})));
    for ws in &mut talker {
        assert_closed_with(&close_frame(ws).await, 4003, "disconnected by an admin");
    }
    still_open(&mut bystander).await;
    let (status, v) = admin_call(addr, "POST", "/users/talker/disconnect", &admin_token()).await;
    assert_eq!((status, v), (200, json!({"closed": 0})));
    let user = token("talker");
    let (status, _) = admin_call(addr, "POST", "/users/talker/disconnect", &user).await;
    assert_eq!(status, 403);
    assert_eq!(total(&server, |m| m.admin_disconnects.get()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_percent_encoded_user_reaches_them_and_closes_their_connections() {
    let server = start(config());
    let addr = server.local_addr();
    let mut jose = connect_user(addr, "josé").await;
    send(
        &mut jose,
        json!({"type": "user_message", "content": "hola"}),
    )
    .await;
    until(&mut jose, "ai_done").await;

    let (status, v) = admin_call(addr, "GET", "/users/jos%C3%A9/export", &admin_token()).await;
    assert_eq!(status, 200);
    assert_eq!(v["user_id"], "josé");
    assert_eq!(v["sessions"].as_array().map(Vec::len), Some(1), "{v}");

    let (status, v) = admin_call(addr, "DELETE", "/users/jos%C3%A9", &admin_token()).await;
    assert_eq!(
        (status, v),
        (
            200,
            json!({"user_id": "josé", "deleted": true, "closed": 1})
        )
    );
    assert_closed_with(&close_frame(&mut jose).await, 4003, "user deleted");
    let (_, v) = admin_call(addr, "GET", "/users/jos%C3%A9/export", &admin_token()).await;
    assert_eq!(v["sessions"], json!([]));
}

/// A name other than `than` owned by the same core.
fn same_core_as(than: &str, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|u| owner_core(u, 2) == owner_core(than, 2))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_or_delete_the_users_core_cannot_confirm_is_a_503() {
    // A text frame "block-core" stops its core's thread until the test releases it.
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
    let hooks = Hooks {
        on_text: Some(Arc::new(move |text: &str| {
            if text == "block-core" {
                entered_tx.lock().unwrap().send(()).unwrap();
                let _ = release_rx.lock().unwrap().recv_timeout(WAIT);
            }
        })),
        ..Default::default()
    };
    // The admin API waits half the request time (1 s) for the user's core.
    let cfg = Config {
        http_request_timeout_ms: 2000,
        http_head_timeout_ms: 2000,
        ..config()
    };
    let server = start_with(cfg, hooks);
    let addr = server.local_addr();
    let (gone, deleted) = (
        same_core_as("blocker", "gone"),
        same_core_as("blocker", "deleted"),
    );
    let mut blocker = connect_user(addr, "blocker").await;
    let _gone_ws = connect_user(addr, &gone).await;
    let entered = Arc::new(Mutex::new(entered_rx));
    // The admin's requests come from an address whose per-address limits live on
    // the core that is not blocked: from one counted on the blocked core, every
    // request would wait for that core at the front door (and be refused there as
    // `overloaded`) before reaching the admin API this test is about.
    let blocked = owner_core("blocker", 2);
    let src = (2..=250u8)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 0, i))
        .find(|ip| AddrKey::of((*ip).into()).home(2) != blocked)
        .unwrap();

    // Each request is its own TCP connection, which the kernel gives to either core:
    // those on the blocked core wait, those on the other one ask the blocked core,
    // and the first answer, which comes while it is blocked, must not be a success.
    for (method, path) in [
        ("POST", format!("/users/{gone}/disconnect")),
        ("DELETE", format!("/users/{deleted}")),
    ] {
        send_text(&mut blocker, "block-core").await;
        let entered = entered.clone();
        tokio::task::spawn_blocking(move || entered.lock().unwrap().recv_timeout(WAIT).unwrap())
            .await
            .unwrap();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let path = path.clone();
            calls.spawn(async move {
                admin_call_on(
                    tcp_from(addr, src.into()).await,
                    method,
                    &path,
                    &admin_token(),
                )
                .await
            });
        }
        let (status, v) = calls.join_next().await.unwrap().unwrap();
        assert_eq!(
            (status, &v["error"]["code"]),
            (503, &json!("unavailable")),
            "{method}: {v}"
        );
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("did not confirm"), "{message}");
        if method == "DELETE" {
            assert!(message.contains("data was deleted"), "{message}");
        }
        release_tx.send(()).unwrap();
        while let Some(answer) = calls.join_next().await {
            let (status, v) = answer.unwrap();
            assert!(status == 200 || status == 503, "{status} {v}");
        }
        // The blocked frame is answered once its core goes on; the core lives on.
        assert_eq!(recv(&mut blocker).await["code"], "invalid_message");
        still_open(&mut blocker).await;
    }
}

async fn send_text(ws: &mut Ws, text: &str) {
    use futures_util::SinkExt;
    ws.send(Message::text(text)).await.unwrap();
}
