//! Upgraded connections: sharding and the per-user cap, limits, keep-alive, panics,
//! broadcast, and both I/O drivers.

mod common;

use std::sync::Arc;

use chatbox::config::IoDriver;
use chatbox::runtime::mesh::owner_core;
use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_cap_is_enforced_on_the_owning_core() {
    let server = start(config());
    let addr = server.local_addr();
    let user = "alice";
    let owner = owner_core(user, 2);
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(connect_user(addr, user).await);
    }
    let err = connect(addr, "/ws", Some(&token(user)), None)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refusal(err), (429, "too_many_connections".into()));
    // Another user is not affected by alice's cap.
    let other = connect_user(addr, "bob").await;

    // All of alice's connections live on her core, wherever the kernel accepted
    // them, and none on the other one.
    let m = server.metrics();
    let bob_here = u64::from(owner_core("bob", 2) == owner);
    assert_eq!(m[owner].ws_open.get(), 10 + bob_here);
    assert_eq!(m[1 - owner].ws_open.get(), 1 - bob_here);

    // Closing one frees a slot.
    close_and_wait(conns.pop().unwrap()).await;
    conns.push(connect_user(addr, user).await);
    let err = connect(addr, "/ws", Some(&token(user)), None)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refusal(err), (429, "too_many_connections".into()));
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_spread_over_cores_and_handover_happens() {
    let server = start(config());
    let addr = server.local_addr();
    let mut conns = Vec::new();
    for i in 0..64 {
        conns.push(connect_user(addr, &format!("user-{i}")).await);
    }
    for ws in conns.iter_mut().take(8) {
        // Chat frames are parsed and answered with one error frame carrying the id.
        ws.send(Message::text(r#"{"type":"bogus","id":"c1"}"#))
            .await
            .unwrap();
        let Some(Message::Text(t)) = next_msg(ws).await else {
            panic!("error frame")
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str(), v["id"].as_str()),
            (Some("error"), Some("invalid_message"), Some("c1"))
        );
    }
    let m = server.metrics();
    let expect: Vec<u64> = (0..2)
        .map(|c| {
            (0..64)
                .filter(|i| owner_core(&format!("user-{i}"), 2) == c)
                .count() as u64
        })
        .collect();
    assert_eq!(
        [m[0].ws_open.get(), m[1].ws_open.get()],
        [expect[0], expect[1]]
    );
    // 64 connections over two listeners: some were accepted by the non-owning core.
    assert!(total(&server, |m| m.handovers_in.get()) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_and_binary_chat_frames_get_close_codes() {
    let server = start(chatbox::Config {
        ws_frame_bytes_max: 1024,
        ws_message_bytes_max: 2048,
        ..config()
    });
    let addr = server.local_addr();
    let mut ws = connect(addr, "/echo", None, None).await.unwrap();
    echo_roundtrip(&mut ws, &"x".repeat(1024)).await;
    ws.send(Message::text("y".repeat(1025))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size));

    let mut ws = connect_user(addr, "bin").await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Unsupported));
    // The server carries on.
    let mut ws = connect(addr, "/echo", None, None).await.unwrap();
    echo_roundtrip(&mut ws, "still here").await;
}

/// The flood guard counts frames of every kind: a client that sends only pings, or
/// only continuation fragments of a message it never finishes, is closed with 1008
/// like one that floods text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_pings_or_fragments_close_with_1008() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let server = start(chatbox::Config {
        ws_frames_per_minute_max: 100,
        ..config()
    });
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "pinger").await;
    for i in 0..101u8 {
        if ws.send(Message::Ping(vec![i].into())).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Policy));

    let mut ws = connect_user(addr, "fragmenter").await;
    let first = Frame::message(b"{".to_vec(), OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(first)).await.unwrap();
    for _ in 0..100 {
        let more = Frame::message(Vec::new(), OpCode::Data(Data::Continue), false);
        if ws.send(Message::Frame(more)).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Policy));
    // A connection within its allowance is untouched, pings included.
    let mut calm = connect_user(addr, "calm").await;
    ws_ping_and_chat(&mut calm).await;
}

/// A few pings, then a message that gets its answer.
async fn ws_ping_and_chat(ws: &mut Ws) {
    for _ in 0..5 {
        ws.send(Message::Ping(Vec::new().into())).await.unwrap();
    }
    send(
        ws,
        serde_json::json!({"type": "user_message", "content": "hi", "id": "c1"}),
    )
    .await;
    until(ws, "ai_done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_pong_deadline() {
    let server = start(chatbox::Config {
        ws_ping_interval_ms: 50,
        ws_pong_timeout_ms: 50,
        ..config()
    });
    let addr = server.local_addr();
    // A raw client that completes the handshake and then never answers.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /chatbox/ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        token("silent")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("server closes in time")
        .unwrap();
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 101"));
    let frames = parse_server_frames(&got[head_end..]);
    assert_eq!(
        frames.first().map(|f| f.0),
        Some(0x9),
        "a ping came first: {frames:?}"
    );
    let close = frames.iter().find(|f| f.0 == 0x8).expect("a close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 1008);
    assert_eq!(&close.1[2..], b"pong timeout");
    assert_eq!(total(&server, |m| m.pong_timeouts.get()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answering_client_survives_many_ping_rounds() {
    let server = start(chatbox::Config {
        ws_ping_interval_ms: 30,
        ws_pong_timeout_ms: 30,
        ..config()
    });
    let mut ws = connect(server.local_addr(), "/echo", None, None)
        .await
        .unwrap();
    // tungstenite answers each ping while we read; count five of them.
    let mut pings = 0;
    while pings < 5 {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws))
            .await
            .unwrap()
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    echo_roundtrip(&mut ws, "alive").await;
    assert_eq!(total(&server, |m| m.pong_timeouts.get()), 0);
    // Traffic of a connection that is still open is already counted.
    assert!(total(&server, |m| m.bytes_in.get()) >= "alive".len() as u64);
    assert!(total(&server, |m| m.bytes_out.get()) >= "alive".len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_closes_only_its_connection() {
    let hooks = chatbox::Hooks {
        on_text: Some(Arc::new(|text: &str| {
            if text == "boom" {
                panic!("handler bug triggered on purpose");
            }
        })),
        ..Default::default()
    };
    let server = start_with(config(), hooks);
    let addr = server.local_addr();
    let mut bystanders = Vec::new();
    for i in 0..4 {
        bystanders.push(connect_user(addr, &format!("by-{i}")).await);
    }
    let mut echo_bystander = connect(addr, "/echo", None, None).await.unwrap();
    let mut victim = connect(addr, "/echo", None, None).await.unwrap();
    victim.send(Message::text("boom")).await.unwrap();
    assert_eq!(close_code(&mut victim).await, Some(CloseCode::Error));
    echo_roundtrip(&mut echo_bystander, "fine").await;
    for ws in &mut bystanders {
        ws.send(Message::text("{}")).await.unwrap();
        assert!(matches!(next_msg(ws).await, Some(Message::Text(_))));
    }
    assert_eq!(total(&server, |m| m.panics.get()), 1);
    let (_, _, body) = get(addr, "/chatbox/metrics").await;
    assert!(body.contains("chatbox_panics_total 1"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_connection_on_every_core() {
    let server = start(config());
    let addr = server.local_addr();
    let mut conns = Vec::new();
    for i in 0..20 {
        conns.push(connect_user(addr, &format!("b-{i}")).await);
    }
    conns.push(connect(addr, "/echo", None, None).await.unwrap());
    assert!(server.broadcast(r#"{"type":"notice"}"#).is_empty());
    for ws in &mut conns {
        match next_msg(ws).await {
            Some(Message::Text(t)) => assert_eq!(t.as_str(), r#"{"type":"notice"}"#),
            other => panic!("expected the broadcast, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_driver_serves_the_same_machinery() {
    let server = start(chatbox::Config {
        io_driver: IoDriver::Epoll,
        ..config()
    });
    assert!(server
        .drivers()
        .iter()
        .all(|d| *d == chatbox::runtime::Driver::Epoll));
    let addr = server.local_addr();
    let mut ws = connect(addr, "/echo", None, None).await.unwrap();
    for i in 0..50 {
        echo_roundtrip(&mut ws, &format!("m{i}")).await;
    }
    let big = "z".repeat(60_000);
    echo_roundtrip(&mut ws, &big).await;
    let mut conns = Vec::new();
    for i in 0..10 {
        conns.push(connect_user(addr, &format!("e-{i}")).await);
    }
    let err = {
        let mut same = Vec::new();
        for _ in 0..10 {
            same.push(connect_user(addr, "e-cap").await);
        }
        connect(addr, "/ws", Some(&token("e-cap")), None)
            .await
            .map(|_| ())
            .unwrap_err()
    };
    assert_eq!(refusal(err), (429, "too_many_connections".into()));
}

/// (opcode, payload) of unmasked server frames.
fn parse_server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let op = b[0] & 0x0f;
        let (len, hdr) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        out.push((op, b[hdr..hdr + len].to_vec()));
        b = &b[hdr + len..];
    }
    out
}
