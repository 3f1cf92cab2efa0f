//! The baseline: what a Rust user would write without chatbox. tokio's
//! multi-threaded runtime, tokio-tungstenite with its defaults, the same JWT check
//! at the upgrade, and per message the same JSON work as a chat frame's cheapest
//! answer: parse the frame, answer `{"type":"ack","id":...}`. No storage, no model.
//!
//! Usage: baseline-server ADDR SECRET THREADS   (prints "listening on ADDR")

use std::sync::Arc;

use chatbox::auth::Verifier;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (addr, secret, threads) = match args.as_slice() {
        [_, a, s, t] => (a.clone(), s.clone(), t.parse().unwrap_or(2)),
        _ => {
            eprintln!("usage: baseline-server ADDR SECRET THREADS");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve(addr, Arc::new(Verifier::new(secret.as_bytes()))));
}

async fn serve(addr: String, verifier: Arc<Verifier>) {
    let listener = TcpListener::bind(&addr).await.expect("bind");
    println!("listening on {}", listener.local_addr().unwrap());
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let verifier = verifier.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            // The signature is tokio-tungstenite's handshake callback; not ours to shrink.
            #[allow(clippy::result_large_err)]
            let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                let token = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned);
                match token.map(|t| verifier.verify(&t)) {
                    Some(Ok(_)) => Ok(resp),
                    _ => {
                        let mut e = ErrorResponse::new(Some("unauthorized".into()));
                        *e.status_mut() = 401u16.try_into().unwrap();
                        Err(e)
                    }
                }
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(t) => match serde_json::from_str::<serde_json::Value>(&t) {
                        Ok(v) => serde_json::json!({"type": "ack", "id": v["id"]}).to_string(),
                        Err(_) => r#"{"type":"error","code":"invalid_message"}"#.to_string(),
                    },
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(Message::text(reply)).await.is_err() {
                    break;
                }
            }
        });
    }
}
