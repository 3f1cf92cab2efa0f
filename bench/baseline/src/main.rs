//! The baseline: what a Rust user would write without chatbox. tokio's
//! multi-threaded runtime, tokio-tungstenite with its defaults, the same JWT check
//! at the upgrade, and per message the same JSON work as chatbox's cheapest answer:
//! parse the frame, answer `{"type":"ack","id":...,"session_id":...}`. No storage,
//! no model. For the `stream` scenario it streams the demo answer's chunks with a
//! pause between them; for `takeover` it relays an `admin_message` to the session's
//! user through a shared map of senders (`Arc<Mutex<HashMap>>`, as one would).
//!
//! Usage: baseline-server ADDR SECRET THREADS [CHUNK_MS]   (prints "listening on ADDR")

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatbox::auth::Verifier;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (addr, secret, threads, chunk_ms) = match args.as_slice() {
        [_, a, s, t] => (a.clone(), s.clone(), t.parse().unwrap_or(2), 20),
        [_, a, s, t, c] => (
            a.clone(),
            s.clone(),
            t.parse().unwrap_or(2),
            c.parse().unwrap_or(20),
        ),
        _ => {
            eprintln!("usage: baseline-server ADDR SECRET THREADS [CHUNK_MS]");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared {
        verifier: Verifier::new(secret.as_bytes()),
        sessions: Mutex::new(HashMap::new()),
        chunk_pause: Duration::from_millis(chunk_ms),
    });
    rt.block_on(serve(addr, shared));
}

struct Shared {
    verifier: Verifier,
    /// Session id -> its user's connection.
    sessions: Mutex<HashMap<String, mpsc::UnboundedSender<String>>>,
    chunk_pause: Duration,
}

async fn serve(addr: String, shared: Arc<Shared>) {
    let listener = TcpListener::bind(&addr).await.expect("bind");
    println!("listening on {}", listener.local_addr().unwrap());
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            // The verified user's id, for its session.
            let mut user = String::new();
            // The signature is tokio-tungstenite's handshake callback; not ours to shrink.
            #[allow(clippy::result_large_err)]
            let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                let token = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned);
                match token.map(|t| shared.verifier.verify(&t)) {
                    Some(Ok(id)) => {
                        user = id.user_id.to_string();
                        Ok(resp)
                    }
                    _ => {
                        let mut e = ErrorResponse::new(Some("unauthorized".into()));
                        *e.status_mut() = 401u16.try_into().unwrap();
                        Err(e)
                    }
                }
            };
            let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                return;
            };
            connection(ws, user, shared).await;
        });
    }
}

/// One connection: answers each frame at once; frames pushed by other tasks
/// (streamed chunks, relayed admin messages) arrive through `rx`.
async fn connection(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    user: String,
    shared: Arc<Shared>,
) {
    let (push, mut rx) = mpsc::unbounded_channel::<String>();
    let session = format!("s-{user}");
    loop {
        let reply = tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<serde_json::Value>(&t) {
                    Ok(v) => on_frame(&v, &session, &push, &shared),
                    Err(_) => r#"{"type":"error","code":"invalid_message"}"#.to_string(),
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            },
            Some(out) = rx.recv() => out,
        };
        if ws.send(Message::text(reply)).await.is_err() {
            break;
        }
    }
    shared.sessions.lock().unwrap().remove(&session);
}

/// The immediate answer to one frame; may start a stream or relay a message.
fn on_frame(
    v: &serde_json::Value,
    session: &str,
    push: &mpsc::UnboundedSender<String>,
    shared: &Arc<Shared>,
) -> String {
    match v["type"].as_str() {
        Some("user_message") => {
            shared
                .sessions
                .lock()
                .unwrap()
                .entry(session.to_owned())
                .or_insert_with(|| push.clone());
            if shared.chunk_pause > Duration::ZERO {
                let (push, pause) = (push.clone(), shared.chunk_pause);
                let prompt = v["content"].as_str().unwrap_or_default().to_owned();
                let session = session.to_owned();
                tokio::spawn(stream_answer(push, pause, prompt, session));
            }
        }
        Some("admin_message") => {
            let target = v["session_id"].as_str().unwrap_or_default();
            let frame = serde_json::json!({"type": "admin_message", "session_id": target,
                                           "content": v["content"]})
            .to_string();
            if let Some(user) = shared.sessions.lock().unwrap().get(target) {
                let _ = user.send(frame);
            }
        }
        _ => {}
    }
    serde_json::json!({"type": "ack", "id": v["id"], "session_id": session}).to_string()
}

/// The demo answer, chunk by chunk, then `ai_done`.
async fn stream_answer(
    push: mpsc::UnboundedSender<String>,
    pause: Duration,
    prompt: String,
    session: String,
) {
    let chunks = chatbox::llm::demo::answer(&prompt);
    for (i, c) in chunks.iter().enumerate() {
        tokio::time::sleep(pause).await;
        let f = serde_json::json!({"type": "ai_chunk", "session_id": session, "seq": i + 1, "content": c});
        if push.send(f.to_string()).is_err() {
            return;
        }
    }
    let _ = push.send(serde_json::json!({"type": "ai_done", "session_id": session}).to_string());
}
