//! Help-request notifications: a signed, timestamped webhook with retries, a restart in the
//! middle, dead letters, a stalled receiver that must not slow chat down, and
//! e-mail through a local SMTP server.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const HOOK_SECRET: &str = "webhook-secret-0123456789";

/// One webhook request as received.
#[derive(Debug, Clone)]
struct Hook {
    headers: String,
    body: String,
}

/// A webhook receiver answering with the scripted statuses in turn (the last one
/// repeats); `None` means: accept and never answer.
async fn receiver(
    listener: TcpListener,
    statuses: Vec<Option<u16>>,
) -> (
    Arc<Mutex<Vec<Hook>>>,
    tokio::sync::mpsc::UnboundedReceiver<Hook>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let status = statuses[n.min(statuses.len() - 1)];
            n += 1;
            let (s, tx) = (s.clone(), tx.clone());
            tokio::spawn(async move {
                let Some((headers, body)) = read_request(&mut sock).await else {
                    return;
                };
                let mut chunk = [0u8; 64];
                let hook = Hook {
                    headers,
                    body: String::from_utf8_lossy(&body).into(),
                };
                s.lock().unwrap().push(hook.clone());
                let _ = tx.send(hook);
                match status {
                    Some(code) => {
                        let resp = format!(
                            "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        let _ = sock.write_all(resp.as_bytes()).await;
                    }
                    None => {
                        // Stall: hold the connection without answering.
                        let _ = sock.read(&mut chunk).await;
                    }
                }
            });
        }
    });
    (seen, rx)
}

fn with_webhook(port: u16) -> chatbox::Config {
    chatbox::Config {
        notify_webhook_url: Some(format!("http://127.0.0.1:{port}/hooks/help")),
        notify_webhook_secret: Some(HOOK_SECRET.into()),
        notify_retry_base_ms: 20,
        ..config()
    }
}

/// A session for `user` with a help request in it; returns the session id.
async fn ask_for_help(ws: &mut Ws) -> String {
    send(
        ws,
        json!({"type": "user_message", "content": "I need a person"}),
    )
    .await;
    let sid = until(ws, "session").await.0["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    until(ws, "ai_done").await;
    send(ws, json!({"type": "help_request", "session_id": sid})).await;
    until(ws, "help_requested").await;
    sid
}

async fn next_hook(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Hook>) -> Hook {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("webhook called in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_is_signed_and_retried_until_it_succeeds() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_, mut hooks) = receiver(listener, vec![Some(500), Some(200)]).await;
    let server = start(with_webhook(port));
    let mut ws = connect_user(server.local_addr(), "needy").await;
    let sid = ask_for_help(&mut ws).await;

    let first = next_hook(&mut hooks).await;
    let second = next_hook(&mut hooks).await;
    assert_eq!(first.body, second.body, "a retry sends the same delivery");
    assert!(
        first.headers.starts_with("post /hooks/help "),
        "{}",
        first.headers
    );
    assert!(first.headers.contains("x-chatbox-event: help_requested"));
    let v: Value = serde_json::from_str(&second.body).unwrap();
    assert_eq!(
        (
            v["event"].as_str(),
            v["session_id"].as_str(),
            v["user_id"].as_str()
        ),
        (Some("help_requested"), Some(sid.as_str()), Some("needy"))
    );
    assert!(
        v.get("content").is_none(),
        "no message content leaves in a notification"
    );
    for hook in [&first, &second] {
        verify_signature(hook);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_carries_the_trace_of_the_help_request() {
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_, mut hooks) = receiver(listener, vec![Some(500), Some(200)]).await;
    let server = start(with_webhook(port));
    let parent = format!("00-{TRACE}-b7ad6b7169203331-01");
    let mut ws = connect_traced(server.local_addr(), "traced-needy", &parent).await;
    ask_for_help(&mut ws).await;
    let (first, second) = (next_hook(&mut hooks).await, next_hook(&mut hooks).await);
    let v: Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(v["trace_id"], TRACE, "{}", first.body);
    let (a, b) = (
        traceparent_of(&first.headers),
        traceparent_of(&second.headers),
    );
    assert_eq!((a.0.as_str(), b.0.as_str()), (TRACE, TRACE));
    assert_ne!(a.1, b.1, "each attempt is a span of its own");
    server.shutdown();
    stop(server).await;
}

/// Checks a delivery as a receiver would (docs/ADMIN_API.md): the timestamp is
/// recent, and the signature is HMAC-SHA256 over "<timestamp>.<raw body>".
fn verify_signature(hook: &Hook) {
    let header = |name: &str| {
        hook.headers
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} header in {}", hook.headers))
            .trim()
            .to_owned()
    };
    let timestamp = header("x-chatbox-timestamp");
    let sent: u64 = timestamp.parse().expect("Unix seconds");
    let now = chatbox::auth::now_secs();
    assert!(
        sent <= now && now - sent < 60,
        "timestamp {sent} is not now ({now})"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{}", hook.body).as_bytes());
    let expect = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(header("x-chatbox-signature"), expect, "{}", hook.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_notifications_survive_a_restart() {
    // Nobody listens at first: every attempt fails to connect.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Retries stay due soon, so the restarted server delivers promptly whether or
    // not the first one got to fail an attempt (a failed attempt's next try is
    // stored and honoured across the restart).
    let cfg = chatbox::Config {
        notify_retry_base_ms: 100,
        ..with_webhook(port)
    };
    let server = start(cfg.clone());
    let mut ws = connect_user(server.local_addr(), "patient").await;
    let sid = ask_for_help(&mut ws).await;
    drop(ws);
    server.shutdown();
    stop(server).await;

    // The receiver is back, and so is the server.
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("port still free");
    let (_, mut hooks) = receiver(listener, vec![Some(204)]).await;
    let server = start(cfg);
    let hook = next_hook(&mut hooks).await;
    assert!(hook.body.contains(&sid));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_that_always_fails_is_dead_lettered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_, mut hooks) = receiver(listener, vec![Some(503)]).await;
    let cfg = chatbox::Config {
        notify_max_attempts: 3,
        ..with_webhook(port)
    };
    let dir = cfg.data_dir.clone();
    let server = start(cfg);
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "unlucky").await;
    ask_for_help(&mut ws).await;
    for _ in 0..3 {
        next_hook(&mut hooks).await;
    }
    // The third result is recorded after the receiver answered: wait for it.
    wait_for_metric(addr, "chatbox_notifications_dead_total 1").await;
    drop(ws);
    server.shutdown();
    stop(server).await;
    let db = rusqlite::Connection::open(dir.join("chatbox.db")).unwrap();
    let (state, attempts, error): (String, i64, String) = db
        .query_row("SELECT state, attempts, last_error FROM outbox", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((state.as_str(), attempts), ("dead", 3));
    assert!(error.contains("503"), "{error}");
    assert!(hooks.try_recv().is_err(), "no fourth attempt");
}

/// Scrapes /metrics until `line` appears (the server's own record of an event).
async fn wait_for_metric(addr: std::net::SocketAddr, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, body) = get(addr, "/chatbox/metrics").await;
        if body.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metric {line:?} never appeared:\n{body}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_does_not_slow_chat() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_, mut hooks) = receiver(listener, vec![None]).await;
    let server = start(with_webhook(port));
    let mut ws = connect_user(server.local_addr(), "busy").await;
    let sid = ask_for_help(&mut ws).await;
    next_hook(&mut hooks).await; // the receiver now holds the request unanswered
    send(
        &mut ws,
        json!({"type": "user_message", "id": "m2", "session_id": sid, "content": "still typing"}),
    )
    .await;
    assert_eq!(until(&mut ws, "ack").await.0["id"], "m2");
    until(&mut ws, "ai_done").await;
}

/// Just enough SMTP (RFC 5321) to receive one message per connection.
async fn smtp_sink() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut lines = BufReader::new(rd).lines();
                wr.write_all(b"220 sink ESMTP ready\r\n").await.unwrap();
                let mut transcript = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    transcript.push_str(&line);
                    transcript.push('\n');
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("DATA") {
                        wr.write_all(b"354 go ahead\r\n").await.unwrap();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            transcript.push_str(&l);
                            transcript.push('\n');
                        }
                        let _ = tx.send(transcript.clone());
                        b"250 queued\r\n"
                    } else if upper.starts_with("QUIT") {
                        let _ = wr.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 OK\r\n"
                    };
                    wr.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_requests_are_emailed() {
    let (port, mut mails) = smtp_sink().await;
    let server = start(chatbox::Config {
        notify_smtp_host: Some("127.0.0.1".into()),
        notify_smtp_port: port,
        notify_smtp_tls: "none".into(),
        notify_email_from: Some("chatbox@example.com".into()),
        notify_email_to: vec!["support@example.com".into(), "lead@example.com".into()],
        ..config()
    });
    let mut ws = connect_user(server.local_addr(), "mailme").await;
    let sid = ask_for_help(&mut ws).await;
    let mail = tokio::time::timeout(WAIT, mails.recv())
        .await
        .expect("mail in time")
        .unwrap();
    assert!(mail.contains("MAIL FROM:<chatbox@example.com>"), "{mail}");
    assert!(
        mail.contains("RCPT TO:<support@example.com>")
            && mail.contains("RCPT TO:<lead@example.com>"),
        "{mail}"
    );
    assert!(
        mail.contains(&format!("Subject: Help requested in session {sid}")),
        "{mail}"
    );
    assert!(
        mail.contains("mailme name (mailme) asked for a human"),
        "{mail}"
    );
}

#[test]
fn notification_settings_are_validated() {
    let cfg = chatbox::Config {
        notify_webhook_url: Some("http://hooks.example.com/x".into()),
        notify_smtp_host: Some("smtp.example.com".into()),
        notify_email_to: vec!["not an address".into()],
        ..config()
    };
    let e = chatbox::check_config(&cfg, false).unwrap_err().to_string();
    for needle in [
        "must be https",
        "CHATBOX_NOTIFY_WEBHOOK_SECRET",
        "CHATBOX_NOTIFY_EMAIL_FROM",
        "not an e-mail address",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
}
