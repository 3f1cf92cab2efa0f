//! Outbound safety: which URLs chatbox calls (https, or plain http to a host that
//! really is loopback), redirects never followed by the model and webhook clients,
//! the webhook URL kept out of logs and stored errors, and no SMTP login sent in
//! clear text to another machine.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chatbox::config::LlmProvider;
use chatbox::llm::{LlmSection, ModelConfig};
use chatbox::store::{self, Notification, Store, StoreError, StoreFuture, WriteOp};
use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const HOOK_SECRET: &str = "webhook-secret-0123456789";

// --- Fakes -------------------------------------------------------------------

/// A server that counts the connections it gets and answers each request with
/// `status` (and `extra` headers).
async fn http_server(status: u16, extra: String) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            let extra = extra.clone();
            tokio::spawn(async move {
                if read_request(&mut sock).await.is_some() {
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    (addr, hits)
}

/// A server answering 302 to `to` (same path), and one that records being called.
async fn redirect_pair() -> ((SocketAddr, Arc<AtomicUsize>), Arc<AtomicUsize>) {
    let (target, target_hits) = http_server(500, String::new()).await;
    let redirector = http_server(
        302,
        format!("Location: http://{target}/v1/chat/completions\r\n"),
    )
    .await;
    (redirector, target_hits)
}

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Every log line of this test binary, at every chatbox level.
fn logs() -> &'static Mutex<Vec<u8>> {
    struct Sink;
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            LOGS.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("chatbox=trace,info")
            .with_writer(|| Sink)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
    });
    &LOGS
}

/// A store holding one due webhook notification; it reports each failed attempt
/// the notifier records (`Store::write` with `DeliveryFailed`).
struct OneWebhook {
    due: Mutex<Option<Notification>>,
    failed: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
}

impl Store for OneWebhook {
    fn write(&self, ops: Vec<WriteOp>) -> StoreFuture<Vec<store::WriteOutcome>> {
        for op in ops {
            if let WriteOp::DeliveryFailed { error, dead, .. } = op {
                let _ = self.failed.send((error, dead));
            }
        }
        Box::pin(async { Ok(Vec::new()) })
    }
    fn due_notifications(&self, _: i64, _: usize) -> StoreFuture<Vec<Notification>> {
        let due = self.due.lock().unwrap().take().into_iter().collect();
        Box::pin(async move { Ok(due) })
    }
    fn next_notification_at(&self) -> StoreFuture<Option<i64>> {
        Box::pin(async { Ok(None) })
    }
    fn load_session(&self, _: &str, _: usize) -> StoreFuture<Option<store::Loaded>> {
        Box::pin(async { Err(StoreError::Stopped) })
    }
    fn ping(&self) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn messages_after(&self, _: &str, _: u64, _: usize) -> StoreFuture<Vec<store::MessageRecord>> {
        Box::pin(async { Err(StoreError::Stopped) })
    }
    fn list_sessions(&self, _: store::SessionQuery) -> StoreFuture<store::SessionPage> {
        Box::pin(async { Err(StoreError::Stopped) })
    }
    fn session_events(&self, _: &str) -> StoreFuture<Vec<store::SessionEvent>> {
        Box::pin(async { Err(StoreError::Stopped) })
    }
    fn window_metrics(&self, _: Option<i64>, _: Option<i64>) -> StoreFuture<store::WindowMetrics> {
        Box::pin(async { Err(StoreError::Stopped) })
    }
    fn user_sessions(&self, _: &str, _: usize) -> StoreFuture<Vec<store::Loaded>> {
        Box::pin(async { Err(StoreError::Stopped) })
    }
}

/// Runs the notifier against `url` with one attempt per notification and returns
/// the error it stored for the one due webhook.
async fn failed_webhook(url: String) -> String {
    let cfg = chatbox::Config {
        notify_webhook_url: Some(url),
        notify_webhook_secret: Some(HOOK_SECRET.into()),
        notify_max_attempts: 1,
        ..config()
    };
    chatbox::check_config(&cfg, false).expect("the webhook URL is allowed");
    let (failed, mut failures) = tokio::sync::mpsc::unbounded_channel();
    let store = Arc::new(OneWebhook {
        due: Mutex::new(Some(Notification {
            id: 1,
            kind: chatbox::notify::KIND_WEBHOOK.into(),
            payload: json!({"event": "help_requested", "session_id": "s1"}).to_string(),
            attempts: 0,
        })),
        failed,
    });
    // What chatbox::start does before building clients (none may have run yet).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (rt, pool) = chatbox::pool::PoolRuntime::start(1, 64).unwrap();
    let notifier = chatbox::notify::Notifier::new(&cfg, store, &pool).unwrap();
    pool.spawn(Arc::new(notifier).run()).unwrap();
    let (error, dead) = tokio::time::timeout(WAIT, failures.recv())
        .await
        .expect("the attempt is recorded in time")
        .unwrap();
    assert!(dead, "one attempt allowed: dead-lettered");
    rt.shutdown_background();
    error
}

// --- Which URLs ----------------------------------------------------------------

/// `http://127.0.0.1:1@example.com` is a request to example.com (user `127.0.0.1`,
/// password `1`): not loopback, so plain http is refused, for models and webhooks.
#[test]
fn loopback_means_the_host_not_the_user_info() {
    let mut m = ModelConfig::new("remote", LlmProvider::Openai);
    m.base_url = Some("http://127.0.0.1:1@example.com/v1".into());
    let cfg = chatbox::Config {
        llm: LlmSection { models: vec![m] },
        notify_webhook_url: Some("http://127.0.0.1:1@example.com/hook".into()),
        notify_webhook_secret: Some(HOOK_SECRET.into()),
        ..config()
    };
    let e = chatbox::check_config(&cfg, false).unwrap_err().to_string();
    assert!(
        e.contains("llm model \"remote\": base_url must be https"),
        "{e}"
    );
    assert!(
        e.contains("CHATBOX_NOTIFY_WEBHOOK_URL must be https"),
        "{e}"
    );
    assert!(e.contains("not to example.com"), "{e}");

    // The real loopback forms stay allowed.
    for url in [
        "http://127.0.0.1:1/v1",
        "http://localhost:1/v1",
        "http://[::1]:1/v1",
    ] {
        let mut m = ModelConfig::new("local", LlmProvider::Openai);
        m.base_url = Some(url.into());
        let cfg = chatbox::Config {
            llm: LlmSection { models: vec![m] },
            notify_webhook_url: Some(url.into()),
            notify_webhook_secret: Some(HOOK_SECRET.into()),
            ..config()
        };
        chatbox::check_config(&cfg, false).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

// --- Redirects -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_client_follows_no_redirect() {
    let ((redirector, asked), target_hits) = redirect_pair().await;
    let mut m = ModelConfig::new("m", LlmProvider::Openai);
    m.base_url = Some(format!("http://{redirector}/v1"));
    m.api_key = Some("sk-must-not-travel".into());
    m.max_retries = 0;
    let server = start(chatbox::Config {
        llm: LlmSection { models: vec![m] },
        ..config()
    });
    let mut ws = connect_user(server.local_addr(), "redirected").await;
    send(&mut ws, json!({"type": "user_message", "content": "hi"})).await;
    let (err, before) = until(&mut ws, "error").await;
    assert_eq!(err["code"], "llm_unavailable", "{err}");
    assert!(before.iter().all(|v| v["type"] != "ai_done"), "{before:?}");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "the model server was asked"
    );
    // A followed redirect would have reached the target before the error.
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "redirect followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_client_follows_no_redirect() {
    let ((redirector, asked), target_hits) = redirect_pair().await;
    let error = failed_webhook(format!("http://{redirector}/hooks/help")).await;
    assert!(error.contains("302"), "{error}");
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "redirect followed");
}

// --- The webhook URL is a secret -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_url_is_neither_logged_nor_stored() {
    let logs = logs();
    // Nobody listens: reqwest's connection error names the URL it was sending to.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let token = "T0kenInTheP4th-9f8e7d6c5b4a";
    let error = failed_webhook(format!("http://127.0.0.1:{port}/hooks/{token}?sig={token}")).await;
    assert!(error.contains("webhook request failed"), "{error}");
    assert!(
        !error.contains(token),
        "the stored error names the URL: {error}"
    );

    // The notifier logs the failure before it records it, so it is in by now.
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logged.contains("notification dead-lettered"), "{logged}");
    assert!(
        !logged.contains(token),
        "a log line names the URL:\n{logged}"
    );
}

// --- SMTP ----------------------------------------------------------------------

#[test]
fn no_smtp_login_in_clear_text_except_to_loopback() {
    let smtp = |host: &str, tls: &str| chatbox::Config {
        notify_smtp_host: Some(host.into()),
        notify_smtp_tls: tls.into(),
        notify_smtp_username: Some("chatbox".into()),
        notify_smtp_password: Some("smtp-password".into()),
        notify_email_from: Some("chatbox@example.com".into()),
        notify_email_to: vec!["support@example.com".into()],
        ..config()
    };
    let e = chatbox::check_config(&smtp("smtp.example.com", "none"), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("CHATBOX_NOTIFY_SMTP_TLS=none") && e.contains("clear text"),
        "{e}"
    );
    for (host, tls) in [
        ("smtp.example.com", "starttls"),
        ("smtp.example.com", "tls"),
        ("127.0.0.1", "none"),
        ("localhost", "none"),
        ("::1", "none"),
    ] {
        chatbox::check_config(&smtp(host, tls), false)
            .unwrap_or_else(|e| panic!("{host} {tls}: {e}"));
    }
    // Without a login, plain SMTP to a relay is still allowed.
    let anonymous = chatbox::Config {
        notify_smtp_username: None,
        notify_smtp_password: None,
        ..smtp("smtp.example.com", "none")
    };
    chatbox::check_config(&anonymous, false).unwrap();
}
